"""Noise-level schedules for sampling, in the EDM parameterisation (sigma(t) = t, s(t) = 1).

A schedule is a float64 tensor of strictly decreasing sigmas, sigmas[0] the starting noise level; a sampler takes
one step per consecutive pair, so `steps` = len(sigmas) - 1 and Euler costs `steps` denoiser calls. Every schedule
here ends in 0 (the last step lands on the data), as in EDM and k-diffusion: 'edm' (Karras rho-spacing), 'ays'
(Align Your Steps tables), 'ays_gaussian' (AYS's optimum for Gaussian data), 'logsnr' (uniform in log sigma).

    sigmas = get_sigmas("edm", 18, sigma_min=0.002, sigma_max=80.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# Align Your Steps (Sabour, Fidler, Kreis 2024), Table 3: optimised 10-step schedules (11 levels, sigma_max first,
# the model's sigma_min last). "svd" is Stable Video Diffusion, EDM-preconditioned.
AYS_TABLES = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def _check_steps(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"'steps' = {n!r}; must be an integer >= 1")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"'sigma_min' = {sigma_min!r}, 'sigma_max' = {sigma_max!r}; "
                         f"need 0 < sigma_min < sigma_max < inf")


def check_sigmas(sigmas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """`sigmas` as a float64 tensor, or ValueError unless 1-D, finite, >= 2 values, strictly decreasing, >= 0."""
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"'sigmas' = {sigmas!r}; must be a 1-D list or tensor of numbers ({e})") from None
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"'sigmas' has shape {tuple(s.shape)}; must be 1-D with at least 2 values")
    if not torch.isfinite(s).all():
        raise ValueError(f"'sigmas' = {s.tolist()}; must be finite")
    if (s[1:] >= s[:-1]).any():
        raise ValueError(f"'sigmas' = {s.tolist()}; must be strictly decreasing")
    if s[-1] < 0:
        raise ValueError(f"'sigmas' = {s.tolist()}; must be >= 0")
    return s


def edm_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM (Karras et al. 2022, eq. 5): n levels from sigma_max to sigma_min evenly spaced in sigma^(1/rho), then 0.

    s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i = 0..n-1;  s_n = 0.  n = 1: [s_max, 0].
    """
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"'rho' = {rho!r}; must be > 0")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(a + i / (n - 1) * (b - a)) ** rho, torch.zeros(1, dtype=torch.float64)])


def ays_sigmas(n: int, table: str = "svd") -> torch.Tensor:
    """Align Your Steps (Sabour, Fidler, Kreis 2024, Table 3) for `table` in 'sd15', 'sdxl', 'svd', n steps.

    The 11 tabulated levels are resampled to n + 1 by interpolating log sigma linearly in the normalised index
    (the paper's rule for other step counts), and the last level, the model's sigma_min, is replaced by 0: n steps,
    n denoiser calls for Euler, the last step landing on the data. This is what the authors' released schedules do
    (diffusers' AYS timesteps and ComfyUI's AlignYourStepsScheduler); n = 10 gives the table with 0 for its last
    entry. The levels are those of the tabulated model (SVD starts at 700), not of `sigma_max`.
    """
    _check_steps(n)
    if table not in AYS_TABLES:
        raise ValueError(f"'table' = {table!r}; allowed: {', '.join(map(repr, AYS_TABLES))}")
    levels = np.asarray(AYS_TABLES[table], dtype=np.float64)
    grid = np.linspace(0.0, 1.0, len(levels))
    out = np.exp(np.interp(np.linspace(0.0, 1.0, n + 1), grid, np.log(levels)))
    if n + 1 == len(levels):
        out = levels.copy()    # exactly the table, not exp(log(table))
    out[0], out[-1] = levels[0], 0.0
    return torch.from_numpy(out)


def ays_gaussian_sigmas(n: int, c: float, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """AYS Theorem 3.1: the schedule that is optimal for Euler on data N(0, c^2 I), n steps (n Euler calls).

    With u = atan(sigma / c) the levels are evenly spaced in u:
        s_i = c tan((1 - i/(n-1)) atan(s_max/c) + i/(n-1) atan(s_min/c)),  i = 0..n-1;  s_n = 0.
    (The paper indexes from the data side, i/n on t_max; here i counts steps from sigma_max, so the levels decrease.)
    Why it is optimal: on N(0, c^2 I) an Euler step from u_i to u_{i+1} multiplies x by cos(u_i) cos(u_i - u_{i+1}) /
    cos(u_{i+1}), the exact flow by cos(u_i) / cos(u_{i+1}); Euler's total gain is the exact one times
    prod_i cos(u_i - u_{i+1}), which for fixed endpoints is largest when the increments are equal. The last step,
    sigma_min -> 0, is shared with the EDM schedule of the same n, so the two compare step for step.
    """
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    if not 0 < c < math.inf:
        raise ValueError(f"'c' = {c!r}; must be the data's standard deviation, > 0")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    f = torch.arange(n, dtype=torch.float64) / (n - 1)
    u = (1 - f) * math.atan(sigma_max / c) + f * math.atan(sigma_min / c)
    s = c * torch.tan(u)
    s[0], s[-1] = sigma_max, sigma_min    # exact endpoints (tan(atan(x)) can be off by an ulp)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def logsnr_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """Uniform in log-SNR (DPM-Solver's "logSNR" time spacing, Lu et al. 2022): n levels from sigma_max to sigma_min
    evenly spaced in log sigma (= in lambda = -log sigma, so every exponential-integrator step has the same h), then 0.

    s_i = s_max (s_min / s_max)^(i/(n-1)), i = 0..n-1;  s_n = 0.  n = 1: [s_max, 0] (as edm_sigmas: n Euler calls).
    """
    _check_steps(n)
    _check_range(sigma_min, sigma_max)
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    f = torch.arange(n, dtype=torch.float64) / (n - 1)
    s = torch.exp((1 - f) * math.log(sigma_max) + f * math.log(sigma_min))
    s[0], s[-1] = sigma_max, sigma_min    # exact endpoints (exp(log(x)) can be off by an ulp)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


SCHEDULES = {"edm": edm_sigmas, "ays": ays_sigmas, "ays_gaussian": ays_gaussian_sigmas, "logsnr": logsnr_sigmas}


def get_sigmas(schedule: str, steps: int, *, sigma_min: float, sigma_max: float, rho: float = 7.0,
               table: str = "svd", c: float | None = None,
               sigmas: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """One entry point: `schedule` in 'edm', 'ays', 'ays_gaussian', 'logsnr', 'list' ('list' takes `sigmas` as
    given).

    'ays' uses the tabulated model's own levels (`table`), not sigma_min/sigma_max; 'ays_gaussian' needs `c`.
    """
    allowed = (*SCHEDULES, "list")
    if schedule not in allowed:
        raise ValueError(f"'schedule' = {schedule!r}; allowed: {', '.join(map(repr, allowed))}")
    _check_steps(steps)
    if schedule == "list":
        if sigmas is None:
            raise ValueError("'sigmas' is required with schedule 'list'")
        s = check_sigmas(sigmas)
        if len(s) - 1 != steps:
            raise ValueError(f"'steps' = {steps!r} but 'sigmas' has {len(s)} values ({len(s) - 1} steps)")
        return s
    if sigmas is not None:
        raise ValueError(f"'sigmas' is only used with schedule 'list', not {schedule!r}")
    if schedule == "edm":
        return edm_sigmas(steps, sigma_min, sigma_max, rho)
    if schedule == "ays":
        return ays_sigmas(steps, table)
    if schedule == "logsnr":
        return logsnr_sigmas(steps, sigma_min, sigma_max)
    if c is None:
        raise ValueError("'c' is required with schedule 'ays_gaussian' (the data's standard deviation)")
    return ays_gaussian_sigmas(steps, c, sigma_min, sigma_max)

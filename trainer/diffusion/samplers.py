"""Samplers of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma and of its SDE variants (EDM
parameterisation: sigma(t) = t, s(t) = 1, x = y + sigma n).

Each sampler is `sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x`: `x` enters
as noise at sigmas[0] (sigmas[0] * randn), `sigmas` is strictly decreasing (usually ending in 0, see schedules.py),
and the sample at sigmas[-1] comes back. `denoiser(x (B, ...), sigma (B,)) -> D(x; sigma)`, approximately E[y | x].
`callback(i, x, sigma, denoised)` runs after step i with the new x, its level sigma = sigmas[i + 1], and the
denoised estimate the step started from (D at sigmas[i]; for churned Heun at sigma_hat); if it returns a tensor,
that replaces x (guidance such as DPS). Stochastic samplers draw noise with torch.randn(generator=generator).

The exponential-integrator samplers work in lambda = -log sigma, h = lambda_{i+1} - lambda_i; in this
parameterisation the exact solution of the ODE is
    x(lambda_t) = e^{-h} x(lambda_s) + int_0^h e^{-(h - tau)} D(lambda_s + tau) dtau,
and a method of order p replaces D by its interpolating polynomial through the last p denoised values, which needs
    C_0 = 1 - e^{-h},  C_1 = int_0^h e^{-(h-tau)} tau dtau = h - 1 + e^{-h},  C_2 = int_0^h e^{-(h-tau)} tau^2/2 dtau
    = h^2/2 - C_1.
Into sigma = 0 (lambda = inf) every sampler takes the first-order step x = D(x; sigma_i), which is also Euler's step
(EDM Algorithms 1 and 2 do the same); its error is O(sigma_i^2) (the flow is smooth in sigma^2), not a function of
the step count when sigma_min is fixed. Multistep methods start with lower orders (no extra denoiser calls).

lower_order_final (2M, 2M SDE, 3M, UniPC; off by default: measured mixed, docs/diffusion.md), after diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler: on a schedule of fewer than LOWER_ORDER_FINAL_BELOW = 15 steps (steps = len(sigmas) - 1,
the into-zero step included, i.e. the NFE), the last step into a level > 0 is first order and the one before it at
most second order (matters for 3M only; 2M and UniPC's predictor are at most second order anyway). Which steps:
counted from the last step into sigma > 0, since the step into 0 already is x = D; that is diffusers' rule in its
final_sigmas_type 'sigma_min' form (for which the option was made), followed by the denoising step. (In diffusers'
'zero' form the step into 0 itself is the lowered final step, so there 2M is unaffected and 3M only takes order 2
on the step before it.) The option guards short schedules whose last steps are much longer in lambda than the ones
before, where extrapolating from the previous D overshoots (EDM's rho = 7 with 3 steps: 80 -> 2.5 -> 0.002 -> 0,
whose second step would extrapolate from D(80)). At 15 steps or more it changes nothing, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .schedules import check_sigmas

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, float, torch.Tensor], torch.Tensor | None]


LOWER_ORDER_FINAL_BELOW = 15   # diffusers' `len(timesteps) < 15`


def _levels(sigmas) -> list[float]:
    return check_sigmas(sigmas).tolist()


def _last_lowered(s: list[float], lower_order_final: bool) -> int:
    """Index of the step that lower_order_final makes first order: the last step into a level > 0, if the
    schedule has fewer than LOWER_ORDER_FINAL_BELOW steps; else -2 (no step is, nor the one before it)."""
    n = len(s) - 1
    if not lower_order_final or n >= LOWER_ORDER_FINAL_BELOW:
        return -2
    return n - 1 - (s[-1] == 0)


def _full(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the generator's device, so a CPU generator also serves a CUDA x.
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _after(callback: Callback | None, i: int, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    out = callback(i, x, sigma, denoised) if callback is not None else None
    return out if isinstance(out, torch.Tensor) else x


def _non_negative(**options: float) -> None:
    for key, value in options.items():
        if not value >= 0:
            raise ValueError(f"{key!r} = {value!r}; must be >= 0")


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None) -> torch.Tensor:
    """Euler = DDIM (eta = 0) = DPM-Solver-1: x_{i+1} = (s_{i+1}/s_i) x_i + (1 - s_{i+1}/s_i) D(x_i; s_i)."""
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        d = denoiser(x, _full(x, s[i]))
        ratio = s[i + 1] / s[i]
        x = _after(callback, i, ratio * x + (1 - ratio) * d, s[i + 1], d)
    return x


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator: torch.Generator | None = None,
                callback: Callback | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0) -> torch.Tensor:
    """EDM (Karras et al. 2022) Algorithm 2: Heun's method with churn; s_churn = 0 is Algorithm 1 (deterministic).

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= s_i <= S_tmax else 0;  s_hat = s_i (1 + gamma_i);
    x_hat = x_i + sqrt(s_hat^2 - s_i^2) S_noise eps. Noise is drawn only where gamma_i > 0, so a run whose gammas
    are all 0 is the deterministic one, bit for bit, and leaves the generator untouched.
    """
    _non_negative(s_churn=s_churn, s_noise=s_noise)
    s = _levels(sigmas)
    n = len(s) - 1
    for i in range(n):
        # Increase noise temporarily.
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s[i] <= s_tmax else 0.0
        s_hat = s[i] * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat ** 2 - s[i] ** 2) * s_noise * _randn(x, generator)
        # Euler step.
        d = denoiser(x, _full(x, s_hat))
        slope = (x - d) / s_hat
        x_next = x + (s[i + 1] - s_hat) * slope
        # Apply 2nd order correction.
        if s[i + 1] > 0:
            slope_next = (x_next - denoiser(x_next, _full(x, s[i + 1]))) / s[i + 1]
            x_next = x + (s[i + 1] - s_hat) * (0.5 * slope + 0.5 * slope_next)
        x = _after(callback, i, x_next, s[i + 1], d)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator: torch.Generator | None = None,
                    callback: Callback | None = None, lower_order_final: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): with r = h_{i-1} / h_i,
    x_{i+1} = (s_{i+1}/s_i) x_i + (1 - e^{-h}) ((1 + 1/(2r)) D_i - 1/(2r) D_{i-1}); the first step is first order,
    and so is the last step into sigma > 0 under lower_order_final (fewer than 15 steps, see the module docstring).
    It is the SDE form below with eta = 0 (no noise drawn)."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, generator=generator, callback=callback, eta=0.0,
                               lower_order_final=lower_order_final)


def sample_dpmpp_3m(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator: torch.Generator | None = None,
                    callback: Callback | None = None, lower_order_final: bool = False) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, multistep, third order), D interpolated in lambda through D_i, D_{i-1},
    D_{i-2} (Newton form, divided differences f1 = D[i, i-1], f2 = D[i, i-1, i-2]; h1, h2 the previous steps):
        x_{i+1} = e^{-h} x_i + C_0 D_i + C_1 (f1 + h1 f2) + 2 C_2 f2.
    Steps 0 and 1 use orders 1 and 2, and step 0 is revised to second order once D at its end is known
    (x_1 += C_1 (D_1 - D_0) / h_0, trapezoidal, no extra call): a first-order start alone leaves an O(h^2) global
    error, order 2 for the whole run (measured). The 2 on C_2 matters too: the public dpm-solver and k-diffusion
    code weights its D2 = h^2 f2 by -phi_3 = C_2 / h^2, half of this, an O(h^3) local error (also order 2).
    lower_order_final (fewer than 15 steps): the last step into sigma > 0 is first order, the one before it second
    order (step 0's revision is kept: it interpolates between D_0 and D_1, it does not extrapolate).
    """
    s = _levels(sigmas)
    last = _last_lowered(s, lower_order_final)
    hist: list[tuple[float, torch.Tensor]] = []       # (lambda, D) of the previous steps, newest first
    c1_first = 0.0
    for i in range(len(s) - 1):
        d = denoiser(x, _full(x, s[i]))
        if len(hist) == 1:
            # Revise step 0 to second order.
            x = x + c1_first * (d - hist[0][1]) / (-math.log(s[i]) - hist[0][0])
        if s[i + 1] == 0:
            x_next = d
        else:
            lam, h = -math.log(s[i]), math.log(s[i] / s[i + 1])
            c0, c1 = -math.expm1(-h), h + math.expm1(-h)
            c2 = h * h / 2 - c1
            x_next = math.exp(-h) * x + c0 * d
            if not hist:
                c1_first = c1
            elif i != last:
                h1 = lam - hist[0][0]
                f1 = (d - hist[0][1]) / h1
                if len(hist) == 1 or i == last - 1:
                    x_next = x_next + c1 * f1
                else:
                    h2 = hist[0][0] - hist[1][0]
                    f2 = (f1 - (hist[0][1] - hist[1][1]) / h2) / (h1 + h2)
                    x_next = x_next + c1 * (f1 + h1 * f2) + 2 * c2 * f2
            hist = [(lam, d)] + hist[:1]
        x = _after(callback, i, x_next, s[i + 1], d)
    return x


def sample_unipc(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None, lower_order_final: bool = False) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), data prediction, B(h) = e^h - 1 ("bh2"), predictor of order 2 + corrector (UniC).

    With hh = -h, B = e^{hh} - 1, b_1 = (e^{hh} - 1 - hh) / (hh B), b_2 = 2 (e^{hh} - 1 - hh - hh^2/2) / (hh^2 B),
    r = (lambda_{i-1} - lambda_i) / h, D1 = (D_{i-1} - D_i) / r, x_lin = e^{-h} x_i + (1 - e^{-h}) D_i:
      predictor (UniP-2)  x_pred = x_lin - B rho_p D1 with rho_p = 1/2 (first step: x_lin);
      corrector (UniC)    D_t = D(x_pred; s_{i+1}), x_{i+1} = x_lin - B (rho_1 D1 + rho_t (D_t - D_i)) with
                          [[1, 1], [r, 1]] (rho_1, rho_t) = (b_1, b_2) (first step: rho_t = 1/2).
    D_t is the next step's D_i (the corrected x is not re-evaluated), so the corrector costs no call; on the last
    step it is skipped, as it would cost one. Order 3 (the predictor's 2 plus one from the corrector). Into sigma = 0
    the step is x = D_i, taken at the previous step's predicted point: that step's correction is lost, a negligible
    amount at the small sigmas where schedules end. lower_order_final (fewer than 15 steps): the last step into
    sigma > 0 is taken as a first step (UniP-1 = x_lin, UniC-1 with rho_t = 1/2), as diffusers' UniPC does on its
    final step (which diffusers lowers at any step count; here only below 15, so longer runs are unchanged).
    """
    s = _levels(sigmas)
    n = len(s) - 1
    last = _last_lowered(s, lower_order_final)
    d = denoiser(x, _full(x, s[0]))
    d_prev = lam_prev = None
    for i in range(n):
        if s[i + 1] == 0:
            x_next = d_next = d
        else:
            lam, h = -math.log(s[i]), math.log(s[i] / s[i + 1])
            big_b = math.expm1(-h)
            x_lin = math.exp(-h) * x - big_b * d
            r = None if d_prev is None or i == last else (lam_prev - lam) / h
            d1 = None if r is None else (d_prev - d) / r
            # Predictor.
            x_next = x_lin if d1 is None else x_lin - big_b * 0.5 * d1
            d_next = None
            if i + 1 < n:
                # Corrector.
                d_next = denoiser(x_next, _full(x, s[i + 1]))
                if d1 is None:
                    x_next = x_lin - big_b * 0.5 * (d_next - d)
                else:
                    b1 = (big_b + h) / (-h * big_b)
                    b2 = 2 * (big_b + h - h * h / 2) / (h * h * big_b)
                    rho_1 = (b1 - b2) / (1 - r)
                    x_next = x_lin - big_b * (rho_1 * d1 + (b1 - rho_1) * (d_next - d))
            d_prev, lam_prev = d, lam
        x = _after(callback, i, x_next, s[i + 1], d)
        d = d_next
    return x


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator: torch.Generator | None = None,
                        callback: Callback | None = None, eta: float = 1.0,
                        lower_order_final: bool = False) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's midpoint form), eta = 1 the reverse SDE, eta = 0 the ODE:
    x_{i+1} = (s_{i+1}/s_i) e^{-eta h} x_i + (1 - e^{-(1+eta) h}) (D_i + (D_i - D_{i-1}) / (2r))
              + s_{i+1} sqrt(1 - e^{-2 eta h}) eps,  r = h_{i-1} / h_i (first step: D_i alone; so too the last step
    into sigma > 0 under lower_order_final, fewer than 15 steps). The noise drawn does not depend on it.
    """
    _non_negative(eta=eta)
    s = _levels(sigmas)
    last = _last_lowered(s, lower_order_final)
    d_prev = h_prev = None
    for i in range(len(s) - 1):
        d = denoiser(x, _full(x, s[i]))
        if s[i + 1] == 0:
            x_next = d
        else:
            h = math.log(s[i] / s[i + 1])
            dd = d if d_prev is None or i == last else d + (d - d_prev) * (h / (2 * h_prev))
            x_next = (s[i + 1] / s[i]) * math.exp(-eta * h) * x - math.expm1(-(1 + eta) * h) * dd
            if eta > 0:
                x_next = x_next + s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * _randn(x, generator)
            d_prev, h_prev = d, h
        x = _after(callback, i, x_next, s[i + 1], d)
    return x


def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas, *, generator: torch.Generator | None = None,
                           callback: Callback | None = None, eta: float = 1.0) -> torch.Tensor:
    """Ancestral Euler (DDPM's ancestral step in this parameterisation, as in k-diffusion): from s_i to s_{i+1},
    s_up = min(s_{i+1}, eta s_{i+1} sqrt(s_i^2 - s_{i+1}^2) / s_i), s_down = sqrt(s_{i+1}^2 - s_up^2),
    an Euler step to s_down, then noise s_up eps. eta = 0 is Euler.
    """
    _non_negative(eta=eta)
    s = _levels(sigmas)
    for i in range(len(s) - 1):
        d = denoiser(x, _full(x, s[i]))
        s_up = min(s[i + 1], eta * s[i + 1] * math.sqrt(s[i] ** 2 - s[i + 1] ** 2) / s[i])
        s_down = math.sqrt(s[i + 1] ** 2 - s_up ** 2)
        ratio = s_down / s[i]
        x_next = ratio * x + (1 - ratio) * d
        if s_up > 0:
            x_next = x_next + s_up * _randn(x, generator)
        x = _after(callback, i, x_next, s[i + 1], d)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m, "dpmpp_3m": sample_dpmpp_3m,
            "unipc": sample_unipc, "dpmpp_2m_sde": sample_dpmpp_2m_sde, "euler_ancestral": sample_euler_ancestral}
# Samplers that draw noise at their defaults; heun does too when s_churn > 0.
STOCHASTIC = frozenset({"dpmpp_2m_sde", "euler_ancestral"})


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    if name not in SAMPLERS:
        raise ValueError(f"'sampler' = {name!r}; allowed: {', '.join(map(repr, SAMPLERS))}")
    return SAMPLERS[name]


def nfe(name: str, sigmas) -> int:
    """Denoiser calls sampler `name` makes on `sigmas`: one per step; Heun two, but one into sigma = 0."""
    get_sampler(name)
    s = _levels(sigmas)
    steps = len(s) - 1
    return 2 * steps - (s[-1] == 0) if name == "heun" else steps

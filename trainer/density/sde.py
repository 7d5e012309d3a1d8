"""Time grid, reference processes and trajectories of diffusion samplers of unnormalised densities.

The grid is t_k = k dt, dt = 1/T, k = 0..T; samples run from x_0 (noise) to x_T (the target). A policy is
`policy(t (n,), x (n, d)) -> (drift (n, d), log_var (n, d) or None)`; it must act on each row alone (the backward
simulation evaluates it on all T steps in one call of n T rows). log_var is a learned correction of the
reference's step variance, var_k e^{log_var} (None: 0, no correction), as gfn-diffusion's learned variance.

Brownian reference: PIS (Zhang & Chen 2022), TB and VarGrad (Sendera et al. 2024, Sec. 5.1, App. D):
    x_0 = 0
    p_F(x_{k+1} | x_k) = N(x_k + dt u(t_k, x_k), sigma^2 dt e^{log_var} I)
    p_B(x_k | x_{k+1}) = N(t_k/t_{k+1} x_{k+1}, t_k/t_{k+1} sigma^2 dt I)     Brownian bridge to 0; for k = 0 the
                                                                            point mass at 0, log p_B = 0.
u = 0 is Brownian motion sigma W_t, so sum log p_B = log P_ref(x_{1:T}) - log N(x_T; 0, sigma^2 I).

OU reference: DDS, the denoising diffusion sampler (Vargas, Grathwohl, Doucet 2023; not the decomposed diffusion
sampler of inverse problems). The reference is an OU process stationary at N(0, sigma^2 I) and reversible; step k keeps
lambda_k of the state and adds noise of variance sigma^2 b_k^2, b_k^2 = 1 - lambda_k^2 (the DDS paper's alpha_k), so its
exact transitions serve both directions:
    x_0 ~ N(0, sigma^2 I)
    p_F(x_{k+1} | x_k) = N(lambda_k x_k + 2 sigma^2 (1 - lambda_k) f(t_k, x_k), sigma^2 b_k^2 e^{log_var} I)
    p_B(x_k | x_{k+1}) = N(lambda_k x_{k+1}, sigma^2 b_k^2 I)
The forward step is the DDS paper's exponential integrator: the time reversal of the OU with marginals p_t has drift
-beta x + 2 sigma^2 beta f, f = grad log(p_t / N(0, sigma^2 I)); holding f at f(t_k, x_k) and integrating the rest
exactly over the step gives the mean above and the OU's own variance. The policy's drift is f (0: the reference).
Schedules of b_k^2 (`ou_constant`, `ou_cos_sq`, or any sequence via `ou_noise`):
    constant   lambda_k = e^{-beta / T}: memory of x_0 fades as e^{-beta} (e^-5 = 0.7% at the default OU_BETA)
    cos_sq     DDS's code (`cos_sq_fn_step_scheme`, used for its Funnel runs): b_k = min(1, alpha sqrt(Delta_k)),
               Delta_k = t_f c_k / sum_j c_j, c_k = cos^4(pi/2 (k / (T - 1) + s) / (1 + s)), s = 0.008: large steps at
               the noise end, vanishing ones at the target end (the last is ~1e-33), sum_k b_k^2 = alpha^2 t_f.
Steps of tiny variance make log p_F and log p_B ill-conditioned (x_{k+1} - lambda_k x_k is a difference of nearly equal
numbers), so both columns are stored relative to the reference transition p_ref(x_{k+1} | x_k) = N(lambda_k x_k,
sigma^2 b_k^2 I), a common term that cancels in every objective and estimate:
    log_pf[:, k] = log p_F - log p_ref = -1/2 sum_d ((r - a)^2 e^{-log_var} + log_var - r^2)
    log_pb[:, k] = log p_B - log p_ref = log N(x_k; 0, sigma^2 I) - log N(x_{k+1}; 0, sigma^2 I)    (reversibility)
with the standardised increment r = (x_{k+1} - lambda_k x_k) / (sigma b_k) and drift a = 2 sigma f b_k / (1 + lambda_k)
(= 2 sigma^2 (1 - lambda_k) f / (sigma b_k)), each formed without cancellation: r = a + e^{log_var / 2} eps forwards,
r = b_k x_{k+1} / sigma - lambda_k eps backwards (x_k = lambda_k x_{k+1} + sigma b_k eps). log N(x_0; 0, sigma^2 I) is
added to log_pf[:, 0], so sum log p_F - sum log p_B is the log density ratio of the whole path against p_B.

Off-policy exploration (Sendera et al. 2024; gfn-diffusion's add_expl_var) adds exploration_std^2 to every step's
sampling variance; log p_F is the policy's density without it, so exploration moves the samples, not the objective.
Brownian reference only: the OU methods (DDS) differentiate through on-policy paths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

Policy = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
REFERENCES = ("brownian", "ou")
OU_BETA = 5.0


class Trajectory(NamedTuple):
    x: torch.Tensor        # (n, T+1, d): x[:, k] at t_k
    log_pf: torch.Tensor   # (n, T): log p_F(x_{k+1} | x_k); OU: column 0 also holds log N(x_0; 0, sigma^2 I)
    log_pb: torch.Tensor   # (n, T): log p_B(x_k | x_{k+1})


class _Steps(NamedTuple):
    """Per step k: forward mean = scale[k] x_k + gain[k] drift, variance var[k] e^{log_var}; backward mean
    b_scale[k] x_{k+1}, variance b_var[k] (0: the point mass at 0). OU only: b[k] (noise std / sigma) and
    a_gain[k] = gain[k] / (sigma b[k]), the drift in units of the step's noise (module docstring)."""
    scale: list[float]
    gain: list[float]
    var: list[float]
    b_scale: list[float]
    b_var: list[float]
    b: list[float] | None = None
    a_gain: list[float] | None = None


def time_grid(T: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """(T+1,) t_k = k / T."""
    return torch.arange(T + 1, dtype=dtype or torch.get_default_dtype(), device=device) / T


def _check_T(T) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"'T' = {T!r}; must be an integer >= 1 (the number of steps)")


def _positive(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{key!r} = {value!r}; must be a number > 0")
    return float(value)


def ou_constant(T: int, beta: float = OU_BETA) -> list[float]:
    """b_k^2 of the constant-rate OU: 1 - e^{-2 beta / T} at every step."""
    _check_T(T)
    return [-math.expm1(-2 * _positive("ou_beta", beta) / T)] * T


COS_SQ_S = 0.008   # the offset of Nichol & Dhariwal's cosine schedule, as DDS's code uses it


def ou_cos_sq(T: int, alpha: float, tfinal: float) -> list[float]:
    """b_k^2 of DDS's `cos_sq` step scheme (module docstring): min(1, alpha^2 Delta_k), sum_k Delta_k = tfinal."""
    _check_T(T)
    alpha, tfinal = _positive("ou_alpha", alpha), _positive("ou_tfinal", tfinal)
    c = [math.cos(math.pi / 2 * ((k / (T - 1) if T > 1 else 0.0) + COS_SQ_S) / (1 + COS_SQ_S)) ** 4 for k in range(T)]
    total = sum(c)
    return [min(1.0, alpha ** 2 * tfinal * ck / total) for ck in c]


def _steps(reference: str, T, sigma, ou_beta, ou_noise=None) -> _Steps:
    _check_T(T)
    s2 = _positive("sigma", sigma) ** 2
    if reference not in REFERENCES:
        raise ValueError(f"'reference' = {reference!r}; must be one of {REFERENCES}")
    dt = 1.0 / T
    if reference == "brownian":
        ratio = [k / (k + 1) for k in range(T)]   # t_k / t_{k+1}
        return _Steps([1.0] * T, [dt] * T, [s2 * dt] * T, ratio, [r * s2 * dt for r in ratio])
    b2 = ou_constant(T, ou_beta) if ou_noise is None else [float(v) for v in ou_noise]
    if len(b2) != T or not all(0 < v <= 1 for v in b2):
        raise ValueError(f"'ou_noise' has {len(b2)} values in [{min(b2, default=0):g}, {max(b2, default=0):g}]; "
                         f"expected T = {T} step variances b_k^2 in (0, 1]")
    b = [math.sqrt(v) for v in b2]
    lam = [math.sqrt(1 - v) for v in b2]
    sigma = math.sqrt(s2)
    return _Steps(lam, [2 * s2 * v / (1 + l) for v, l in zip(b2, lam)], [s2 * v for v in b2], lam,
                  [s2 * v for v in b2], b, [2 * sigma * bk / (1 + l) for bk, l in zip(b, lam)])


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor | float, var: torch.Tensor | float) -> torch.Tensor:
    """sum over the last axis of log N(x; mean, var): (..., d) -> (...)."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return -0.5 * ((x - mean) ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)


def _randn(shape, generator, dtype, device) -> torch.Tensor:
    # Drawn on the generator's device, so a CPU generator also serves a CUDA run.
    gen_device = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def _policy_step(policy: Policy, t: torch.Tensor, x: torch.Tensor):
    drift, log_var = policy(t, x)
    if drift.shape != x.shape or (log_var is not None and log_var.shape != x.shape):
        raise ValueError(f"policy returned drift {tuple(drift.shape)} and log_var "
                         f"{None if log_var is None else tuple(log_var.shape)} for x {tuple(x.shape)}; expected both "
                         f"{tuple(x.shape)} (log_var may be None)")
    return drift, log_var


def _ou_log_ratio(r: torch.Tensor, a: torch.Tensor, log_var: torch.Tensor | None) -> torch.Tensor:
    """log p_F - log p_ref of an OU step from its standardised increment r and drift a (module docstring)."""
    if log_var is None:
        return (a * (r - 0.5 * a)).sum(-1)          # -1/2 ((r - a)^2 - r^2)
    return -0.5 * ((r - a) ** 2 * torch.exp(-log_var) + log_var - r ** 2).sum(-1)


def _half_sq_norm_diff(x: torch.Tensor, y: torch.Tensor, s2: float) -> torch.Tensor:
    """log N(x; 0, s2 I) - log N(y; 0, s2 I)."""
    return 0.5 * (y.square().sum(-1) - x.square().sum(-1)) / s2


def simulate_forward(policy: Policy, n: int, T: int, sigma: float, generator: torch.Generator | None = None,
                     exploration_std: float = 0.0, *, dim: int, reference: str = "brownian", ou_beta: float = OU_BETA,
                     ou_noise: Sequence[float] | None = None, keep_graph: bool = False,
                     dtype: torch.dtype | None = None, device=None,
                     noise: Callable[[int], torch.Tensor] | None = None) -> Trajectory:
    """n trajectories x_0 -> x_T under the policy, with per-step log p_F and log p_B (OU: both relative to the
    reference transition; module docstring). The OU steps' b_k^2 are `ou_noise` when given, else `ou_constant(T,
    ou_beta)`.

    The standard normal noise is noise(k) (n, dim) for step k (k = -1: the OU start) when given (e.g. rows of a
    global batch's noise, so trajectories do not depend on how a batch is split), else drawn from `generator`.

    keep_graph=False (TB, VarGrad, off-policy training): every state is detached, so gradients reach the policy only
    through log p_F of the given path. keep_graph=True (PIS, DDS): the path stays a differentiable function of the
    policy (reparameterised noise); exploration is then refused, since it would no longer sample the policy."""
    steps = _steps(reference, T, sigma, ou_beta, ou_noise)
    for key, value in (("n", n), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key!r} = {value!r}; must be an integer >= 1")
    if not 0 <= exploration_std < math.inf:
        raise ValueError(f"'exploration_std' = {exploration_std!r}; must be >= 0")
    if keep_graph and exploration_std > 0:
        raise ValueError(f"'exploration_std' = {exploration_std!r} with keep_graph=True: the reparameterised "
                         f"objectives (PIS, DDS) need on-policy paths")
    if reference == "ou" and exploration_std > 0:
        raise ValueError(f"'exploration_std' = {exploration_std!r} with the OU reference: exploration is for the "
                         f"Brownian reference's off-policy objectives (TB, VarGrad)")
    dtype = dtype or torch.get_default_dtype()
    s2 = float(sigma) ** 2

    def draw(k: int) -> torch.Tensor:
        if noise is None:
            return _randn((n, dim), generator, dtype, device)
        z = noise(k)
        if z.shape != (n, dim):
            raise ValueError(f"'noise'({k}) has shape {tuple(z.shape)}; expected ({n}, {dim})")
        return z.to(device=device, dtype=dtype)

    t = time_grid(T, dtype, device)
    if reference == "brownian":
        x = torch.zeros(n, dim, dtype=dtype, device=device)
        log_p0 = torch.zeros(n, dtype=dtype, device=device)
    else:
        x = sigma * draw(-1)
        log_p0 = gaussian_log_prob(x, 0.0, s2)
    xs, log_pf, log_pb = [x], [], []
    for k in range(T):
        drift, log_var = _policy_step(policy, t[k].expand(n), x)
        z = draw(k)
        mean = steps.scale[k] * x + steps.gain[k] * drift
        if steps.b is None:
            var = torch.full_like(x, steps.var[k]) if log_var is None else steps.var[k] * torch.exp(log_var)
            x_next = mean + torch.sqrt(var + exploration_std ** 2) * z
            if not keep_graph:
                x_next = x_next.detach()
            log_pf.append(gaussian_log_prob(x_next, mean, var))
            log_pb.append(_backward_log_prob(steps, k, x, x_next))
        else:
            sd_rel = z if log_var is None else torch.exp(0.5 * log_var) * z    # noise in units of sigma b_k
            x_next = mean + (float(sigma) * steps.b[k]) * sd_rel
            if not keep_graph:
                x_next = x_next.detach()
            a = steps.a_gain[k] * drift
            log_pf.append(_ou_log_ratio(a + sd_rel, a, log_var))
            log_pb.append(_half_sq_norm_diff(x, x_next, s2))
        x = x_next
        xs.append(x)
    log_pf[0] = log_pf[0] + log_p0
    return Trajectory(torch.stack(xs, 1), torch.stack(log_pf, 1), torch.stack(log_pb, 1))


def _backward_log_prob(steps: _Steps, k: int, x: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
    if steps.b_var[k] == 0:   # the bridge's last step lands on x_0 = 0 with certainty
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return gaussian_log_prob(x, steps.b_scale[k] * x_next, steps.b_var[k])


def simulate_backward(policy: Policy, x1: torch.Tensor, T: int, sigma: float,
                      generator: torch.Generator | None = None, *, reference: str = "brownian",
                      ou_beta: float = OU_BETA, ou_noise: Sequence[float] | None = None) -> Trajectory:
    """Trajectories ending at the given x1 (n, d) (exact target samples for EUBO, replay-buffer samples for off-policy
    TB), drawn with p_B from x_T = x1 back to x_0, with per-step log p_F and log p_B (OU: relative to the reference
    transition, as in `simulate_forward`). States are detached; gradients reach the policy through log p_F."""
    steps = _steps(reference, T, sigma, ou_beta, ou_noise)
    if x1.ndim != 2:
        raise ValueError(f"'x1' has shape {tuple(x1.shape)}; expected (n, d)")
    n, d = x1.shape
    s2 = float(sigma) ** 2
    x = x1.detach()
    xs, log_pb, r = [x], [], []
    for k in reversed(range(T)):
        if steps.b_var[k] == 0:
            x_prev = torch.zeros_like(x)
        else:
            z = _randn(x.shape, generator, x.dtype, x.device)
            x_prev = steps.b_scale[k] * x + math.sqrt(steps.b_var[k]) * z
        if steps.b is None:
            log_pb.append(_backward_log_prob(steps, k, x_prev, x))
        else:
            r.append(steps.b[k] / float(sigma) * x - steps.b_scale[k] * z)    # (x - lambda_k x_prev) / (sigma b_k)
            log_pb.append(_half_sq_norm_diff(x_prev, x, s2))
        x = x_prev
        xs.append(x)
    path = torch.stack(xs[::-1], 1)                                        # (n, T+1, d)
    t = time_grid(T, x1.dtype, x1.device)[:-1].expand(n, T).reshape(-1)    # (n T,), row-major like path[:, :-1]
    x_k = path[:, :-1].reshape(n * T, d)
    drift, log_var = _policy_step(policy, t, x_k)
    if steps.b is None:      # the Brownian steps are all alike
        mean = x_k + steps.gain[0] * drift
        var = steps.var[0] if log_var is None else steps.var[0] * torch.exp(log_var)
        log_pf = gaussian_log_prob(path[:, 1:].reshape(n * T, d), mean, var).reshape(n, T)
    else:
        a = torch.tensor(steps.a_gain, dtype=x1.dtype, device=x1.device).repeat(n)[:, None] * drift
        log_pf = _ou_log_ratio(torch.stack(r[::-1], 1).reshape(n * T, d), a, log_var).reshape(n, T)
        log_p0 = gaussian_log_prob(path[:, 0], 0.0, s2)
        log_pf = torch.cat([(log_pf[:, 0] + log_p0)[:, None], log_pf[:, 1:]], 1)
    return Trajectory(path, log_pf, torch.stack(log_pb[::-1], 1))

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
sampler of inverse problems). The reference dx = -beta x dt + sigma sqrt(2 beta) dW is stationary at N(0, sigma^2 I)
and reversible, so its exact transitions serve both directions; with lambda = e^{-beta dt} = sqrt(1 - alpha):
    x_0 ~ N(0, sigma^2 I)
    p_F(x_{k+1} | x_k) = N(lambda x_k + 2 sigma^2 (1 - lambda) f(t_k, x_k), sigma^2 alpha e^{log_var} I)
    p_B(x_k | x_{k+1}) = N(lambda x_{k+1}, sigma^2 alpha I)
The forward step is the DDS paper's exponential integrator: the time reversal of the OU with marginals p_t has drift
-beta x + 2 sigma^2 beta f, f = grad log(p_t / N(0, sigma^2 I)); holding f at f(t_k, x_k) and integrating the rest
exactly over the step gives the mean above and the OU's own variance. The policy's drift is f (0: the reference).
log N(x_0; 0, sigma^2 I) is added to log_pf[:, 0], so sum log p_F is the log density of the whole path. Memory of x_0
fades as e^{-beta}: at beta = OU_BETA, e^-5 = 0.7%. beta is constant in time here (OU_BETA is our choice); the DDS
code also offers cosine-shaped per-step schedules, not implemented.

Off-policy exploration (Sendera et al. 2024; gfn-diffusion's add_expl_var) adds exploration_std^2 to every step's
sampling variance; log p_F is the policy's density without it, so exploration moves the samples, not the objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    """Per step k: forward mean = scale x_k + gain drift, variance var e^{log_var}; backward mean b_scale[k] x_{k+1},
    variance b_var[k] (0: the point mass at 0)."""
    scale: float
    gain: float
    var: float
    b_scale: list[float]
    b_var: list[float]


def time_grid(T: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """(T+1,) t_k = k / T."""
    return torch.arange(T + 1, dtype=dtype or torch.get_default_dtype(), device=device) / T


def _steps(reference: str, T, sigma, ou_beta) -> _Steps:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"'T' = {T!r}; must be an integer >= 1 (the number of steps)")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
        raise ValueError(f"'sigma' = {sigma!r}; must be a number > 0")
    if reference not in REFERENCES:
        raise ValueError(f"'reference' = {reference!r}; must be one of {REFERENCES}")
    dt, s2 = 1.0 / T, float(sigma) ** 2
    if reference == "brownian":
        ratio = [k / (k + 1) for k in range(T)]   # t_k / t_{k+1}
        return _Steps(1.0, dt, s2 * dt, ratio, [r * s2 * dt for r in ratio])
    if isinstance(ou_beta, bool) or not isinstance(ou_beta, (int, float)) or not 0 < ou_beta < math.inf:
        raise ValueError(f"'ou_beta' = {ou_beta!r}; must be a number > 0")
    lam = math.exp(-ou_beta * dt)
    alpha = -math.expm1(-2 * ou_beta * dt)
    return _Steps(lam, 2 * s2 * (1 - lam), s2 * alpha, [lam] * T, [s2 * alpha] * T)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor | float, var: torch.Tensor | float) -> torch.Tensor:
    """sum over the last axis of log N(x; mean, var): (..., d) -> (...)."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return -0.5 * ((x - mean) ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)


def _randn(shape, generator, dtype, device) -> torch.Tensor:
    # Drawn on the generator's device, so a CPU generator also serves a CUDA run.
    gen_device = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


def _policy_step(policy: Policy, t: torch.Tensor, x: torch.Tensor, base_var: float):
    drift, log_var = policy(t, x)
    if drift.shape != x.shape or (log_var is not None and log_var.shape != x.shape):
        raise ValueError(f"policy returned drift {tuple(drift.shape)} and log_var "
                         f"{None if log_var is None else tuple(log_var.shape)} for x {tuple(x.shape)}; expected both "
                         f"{tuple(x.shape)} (log_var may be None)")
    var = torch.full_like(x, base_var) if log_var is None else base_var * torch.exp(log_var)
    return drift, var


def simulate_forward(policy: Policy, n: int, T: int, sigma: float, generator: torch.Generator | None = None,
                     exploration_std: float = 0.0, *, dim: int, reference: str = "brownian", ou_beta: float = OU_BETA,
                     keep_graph: bool = False, dtype: torch.dtype | None = None, device=None,
                     noise: Callable[[int], torch.Tensor] | None = None) -> Trajectory:
    """n trajectories x_0 -> x_T under the policy, with per-step log p_F and log p_B.

    The standard normal noise is noise(k) (n, dim) for step k (k = -1: the OU start) when given (e.g. rows of a
    global batch's noise, so trajectories do not depend on how a batch is split), else drawn from `generator`.

    keep_graph=False (TB, VarGrad, off-policy training): every state is detached, so gradients reach the policy only
    through log p_F of the given path. keep_graph=True (PIS, DDS): the path stays a differentiable function of the
    policy (reparameterised noise); exploration is then refused, since it would no longer sample the policy."""
    steps = _steps(reference, T, sigma, ou_beta)
    for key, value in (("n", n), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key!r} = {value!r}; must be an integer >= 1")
    if not 0 <= exploration_std < math.inf:
        raise ValueError(f"'exploration_std' = {exploration_std!r}; must be >= 0")
    if keep_graph and exploration_std > 0:
        raise ValueError(f"'exploration_std' = {exploration_std!r} with keep_graph=True: the reparameterised "
                         f"objectives (PIS, DDS) need on-policy paths")
    dtype = dtype or torch.get_default_dtype()

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
        log_p0 = gaussian_log_prob(x, 0.0, float(sigma) ** 2)
    xs, log_pf, log_pb = [x], [], []
    for k in range(T):
        drift, var = _policy_step(policy, t[k].expand(n), x, steps.var)
        mean = steps.scale * x + steps.gain * drift
        x_next = mean + torch.sqrt(var + exploration_std ** 2) * draw(k)
        if not keep_graph:
            x_next = x_next.detach()
        log_pf.append(gaussian_log_prob(x_next, mean, var))
        log_pb.append(_backward_log_prob(steps, k, x, x_next))
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
                      ou_beta: float = OU_BETA) -> Trajectory:
    """Trajectories ending at the given x1 (n, d) (exact target samples for EUBO, replay-buffer samples for off-policy
    TB), drawn with p_B from x_T = x1 back to x_0, with per-step log p_F and log p_B. States are detached; gradients
    reach the policy through log p_F."""
    steps = _steps(reference, T, sigma, ou_beta)
    if x1.ndim != 2:
        raise ValueError(f"'x1' has shape {tuple(x1.shape)}; expected (n, d)")
    n, d = x1.shape
    x = x1.detach()
    xs, log_pb = [x], []
    for k in reversed(range(T)):
        if steps.b_var[k] == 0:
            x_prev = torch.zeros_like(x)
        else:
            x_prev = steps.b_scale[k] * x + math.sqrt(steps.b_var[k]) * _randn(x.shape, generator, x.dtype, x.device)
        log_pb.append(_backward_log_prob(steps, k, x_prev, x))
        x = x_prev
        xs.append(x)
    path = torch.stack(xs[::-1], 1)                                        # (n, T+1, d)
    t = time_grid(T, x1.dtype, x1.device)[:-1].expand(n, T).reshape(-1)    # (n T,), row-major like path[:, :-1]
    x_k = path[:, :-1].reshape(n * T, d)
    drift, var = _policy_step(policy, t, x_k, steps.var)
    mean = steps.scale * x_k + steps.gain * drift
    log_pf = gaussian_log_prob(path[:, 1:].reshape(n * T, d), mean, var).reshape(n, T)
    if reference == "ou":
        log_p0 = gaussian_log_prob(path[:, 0], 0.0, float(sigma) ** 2)
        log_pf = torch.cat([(log_pf[:, 0] + log_p0)[:, None], log_pf[:, 1:]], 1)
    return Trajectory(path, log_pf, torch.stack(log_pb[::-1], 1))

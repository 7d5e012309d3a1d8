"""Inverse problems with a diffusion prior: sparse point observations, the exact Gaussian posterior, DPS.

Conventions (EDM parameterisation): x = y + sigma n; a denoiser is `denoiser(x (B, *shape), sigma (B,))`
returning D(x; sigma) ~ E[y | x]; fields are (B, C, *grid); `sigmas` is a decreasing 1-D tensor ending in 0.
The Gaussian helpers work on flattened fields: x (B, d), d = C * prod(grid), mean (d,), covariance (d, d).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from trainer.diffusion.analytic import gaussian_denoiser  # noqa: F401  (with (mu_p, S_p): the exact posterior's)

Denoiser = Callable[[Tensor, Tensor], Tensor]


class PointObservation:
    """A = selection of m grid points: a field (B, *shape) -> (B, m), shape = (C, *grid).

    `indices` are flat indices into one field of `shape` (row-major, channel first), so a point of one
    channel is observed; `matrix()` is the dense (m, d) 0/1 form of A.
    """

    def __init__(self, indices: Tensor, shape: tuple[int, ...]):
        shape = tuple(int(n) for n in shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"shape must be a non-empty tuple of positive sizes (C, *grid), got {shape}")
        indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.numel() == 0 or indices.dtype.is_floating_point:
            raise ValueError(f"indices must be a non-empty 1-D integer tensor, got {indices.dtype} "
                             f"of shape {tuple(indices.shape)}")
        d = math.prod(shape)
        if int(indices.min()) < 0 or int(indices.max()) >= d:
            raise ValueError(f"indices must lie in [0, {d}) for shape {shape}, "
                             f"got range [{int(indices.min())}, {int(indices.max())}]")
        if indices.unique().numel() != indices.numel():
            raise ValueError("indices must be distinct (a repeated point makes A A^T singular)")
        self.indices = indices.long()
        self.shape = shape

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def m(self) -> int:
        return self.indices.numel()

    def observe(self, x: Tensor) -> Tensor:
        """A x: (B, *shape) -> (B, m)."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)[:, self.indices.to(x.device)]

    def scatter(self, y: Tensor, fill: float = 0.0) -> Tensor:
        """A^T y for fill = 0: (B, m) -> (B, *shape), `fill` off the observed points (nan for plots)."""
        out = y.new_full((y.shape[0], self.dim), fill)
        out[:, self.indices.to(y.device)] = y
        return out.reshape(y.shape[0], *self.shape)

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense (m, d) matrix of A."""
        a = torch.zeros(self.m, self.dim, dtype=dtype)
        a[torch.arange(self.m), self.indices] = 1
        return a


def random_points(shape: tuple[int, ...], fraction: float, generator: torch.Generator | None = None
                  ) -> PointObservation:
    """Observe max(1, round(fraction * d)) distinct points of a field of `shape`, chosen uniformly."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    d = math.prod(shape)
    m = max(1, round(fraction * d))
    idx = torch.randperm(d, generator=generator)[:m]
    return PointObservation(idx.sort().values, shape)


def gaussian_posterior(mu: Tensor, S: Tensor, A: Tensor, y: Tensor, r: float) -> tuple[Tensor, Tensor]:
    """Posterior N(mu_p, S_p) of x ~ N(mu, S) given y = A x + N(0, r^2 I).

    Information form: S_p = (S^-1 + A^T A / r^2)^-1, mu_p = S_p (S^-1 mu + A^T y / r^2). Computed in the
    equivalent Kalman (Woodbury) form, which needs no S^-1 and holds for r = 0 (exact observations):
        G = A S A^T + r^2 I,  K = S A^T G^-1,  mu_p = mu + K (y - A mu),  S_p = S - K A S.
    mu (d,), S (d, d), A (m, d), y (m,) or (B, m) -> mu_p (d,) or (B, d), S_p (d, d).
    """
    if r < 0:
        raise ValueError(f"r (observation noise std) must be >= 0, got {r}")
    d, m = mu.shape[-1], A.shape[0]
    if S.shape != (d, d) or A.shape != (m, d) or y.shape[-1] != m:
        raise ValueError(f"shapes must be mu (d,), S (d, d), A (m, d), y (..., m); got mu {tuple(mu.shape)}, "
                         f"S {tuple(S.shape)}, A {tuple(A.shape)}, y {tuple(y.shape)}")
    SAt = S @ A.T                                                   # (d, m)
    G = A @ SAt + r**2 * torch.eye(m, dtype=S.dtype, device=S.device)
    L = torch.linalg.cholesky(G)
    K = torch.cholesky_solve(SAt.T, L).T                            # (d, m) = S A^T G^-1
    mu_p = mu + (y - mu @ A.T) @ K.T
    S_p = S - K @ SAt.T
    return mu_p, (S_p + S_p.T) / 2


def dps_sample(denoiser: Denoiser, x: Tensor, sigmas: Tensor, observation: PointObservation, y: Tensor,
               zeta: float, *, generator: torch.Generator | None = None, second_order: bool = True,
               s_churn: float = 0.0) -> Tensor:
    """Diffusion posterior sampling (Chung et al., ICLR 2023) on EDM's probability-flow ODE.

    x (B, *shape) is the state at sigmas[0] (e.g. sigmas[0] * randn); y (B, m) or (m,) the observations.
    Each step i: x_hat = x_i + sqrt(s_hat^2 - s_i^2) eps with s_hat = s_i (1 + gamma),
    gamma = min(s_churn / N, sqrt(2) - 1) (EDM Algorithm 2; s_churn = 0, the default, is the ODE);
    D = D(x_hat; s_hat) with autograd on; the Euler step x' = x_hat + (s_{i+1} - s_hat)(x_hat - D)/s_hat,
    corrected by Heun's rule when second_order and s_{i+1} > 0; then the DPS correction
        x_{i+1} = x' - zeta grad_{x_hat} ||y - A D(x_hat; s_hat)||_2     (per sample).
    This is the official code's form (gradient of the norm, constant scale). It equals Algorithm 1's
    zeta_i grad ||y - A D||_2^2 with the paper's step size zeta_i = zeta' / ||y - A D||, zeta' = zeta / 2.
    The denoiser must treat samples independently (no batch statistics): the per-sample gradients are
    taken as the gradient of the sum of the per-sample norms.
    """
    if zeta < 0 or s_churn < 0:
        raise ValueError(f"zeta and s_churn must be >= 0, got zeta={zeta}, s_churn={s_churn}")
    if sigmas.dim() != 1 or sigmas.numel() < 2 or float(sigmas[-1]) != 0:
        raise ValueError("sigmas must be a decreasing 1-D tensor of at least 2 values ending in 0")
    b, n = x.shape[0], sigmas.numel() - 1
    y = y.to(x).expand(b, observation.m)
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    x = x.detach()
    for s_cur, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        # Increase noise temporarily (EDM Algorithm 2).
        s_hat = s_cur * (1 + gamma)
        if gamma > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + math.sqrt(s_hat**2 - s_cur**2) * eps
        # Denoise with the graph kept for the guidance gradient.
        x = x.requires_grad_(True)
        with torch.enable_grad():
            denoised = denoiser(x, x.new_full((b,), s_hat))
            residual = torch.linalg.vector_norm(y - observation.observe(denoised), dim=1)   # (B,)
            (grad,) = torch.autograd.grad(residual.sum(), x)
        x, denoised = x.detach(), denoised.detach()
        # Euler step.
        d_cur = (x - denoised) / s_hat
        x_next = x + (s_next - s_hat) * d_cur
        # Apply 2nd order correction.
        if second_order and s_next > 0:
            with torch.no_grad():
                d_next = (x_next - denoiser(x_next, x.new_full((b,), s_next))) / s_next
            x_next = x + (s_next - s_hat) * (d_cur + d_next) / 2
        # DPS correction.
        x = x_next - zeta * grad
    return x

"""Exact denoisers and probability-flow solutions for Gaussian and Gaussian-mixture data (EDM parameterisation).

For x = y + sigma n, y ~ N(mu, S): D(x; sigma) = E[y | x] = mu + S (S + sigma^2 I)^-1 (x - mu). For a mixture,
sum_k w_k N(mu_k, S_k), D is the responsibility-weighted sum of the component denoisers, with responsibilities
from N(x; mu_k, S_k + sigma^2 I). Samplers are tested and benchmarked against these. Data are vectors: x is
(B, d), or (B, *shape) flattened to d = prod(shape).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as(t, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t, dtype=like.dtype, device=like.device)


def gaussian_denoiser(mu: torch.Tensor, cov: torch.Tensor) -> Denoiser:
    """D(x; sigma) = mu + S (S + sigma^2 I)^-1 (x - mu) for data N(mu, S), S = cov = U diag(lam) U^T (symmetric PSD:
    a posterior covariance with exact observations is singular), so a different sigma per sample costs nothing:
    S (S + sigma^2 I)^-1 = U diag(lam / (lam + sigma^2)) U^T. mu (d,) or (B, d); x (B, *shape), prod(shape) = d.
    With (mu_p, S_p) from `inverse.gaussian_posterior` it is the exact posterior denoiser."""
    mu = torch.as_tensor(mu, dtype=torch.float64)
    lam, U = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))
    lam = lam.clamp_min(0)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        assert x[0].numel() == U.shape[0], f"field of {x[0].numel()} values for data of dimension {U.shape[0]}"
        u, e, m = _as(U, x), _as(lam, x), _as(mu, x)
        gain = e / (e + sigma.to(x.dtype).reshape(b, 1) ** 2)              # (B, d) in the eigenbasis
        return (m + (((x.reshape(b, -1) - m) @ u) * gain) @ u.T).reshape(x.shape)
    return denoise


def mixture_denoiser(weights: Sequence[float] | torch.Tensor, mus: torch.Tensor, covs: torch.Tensor) -> Denoiser:
    """D(x; sigma) = sum_k r_k(x) D_k(x; sigma), r_k proportional to w_k N(x; mu_k, S_k + sigma^2 I)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    mus = torch.as_tensor(mus, dtype=torch.float64)                        # (K, d)
    ev, q = torch.linalg.eigh(torch.as_tensor(covs, dtype=torch.float64))  # (K, d), (K, d, d)
    assert w.ndim == 1 and mus.shape == ev.shape and (ev > 0).all() and (w > 0).all()
    log_w = torch.log(w / w.sum())

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        m, e, qq, lw = _as(mus, x), _as(ev, x), _as(q, x), _as(log_w, x)
        z = torch.einsum("bkd,kde->bke", x.reshape(len(x), 1, -1) - m, qq)   # (B, K, d) in each eigenbasis
        var = e + sigma.reshape(-1, 1, 1).to(x.dtype) ** 2                  # (B, K, d)
        log_r = lw - 0.5 * (z ** 2 / var + torch.log(2 * math.pi * var)).sum(-1)
        r = torch.softmax(log_r, dim=1)                                      # (B, K)
        d_k = m + torch.einsum("bke,kde->bkd", z * e / var, qq)              # (B, K, d) component denoisers
        return (r.unsqueeze(-1) * d_k).sum(1).reshape(x.shape)
    return denoise


def sample_mixture(weights: Sequence[float] | torch.Tensor, mus: torch.Tensor, covs: torch.Tensor, n: int, *,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n exact samples (n, d) float64 of the mixture, and their component labels (n,)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    mus = torch.as_tensor(mus, dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.as_tensor(covs, dtype=torch.float64))
    labels = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
    eps = torch.randn(n, mus.shape[1], dtype=torch.float64, generator=generator)
    return mus[labels] + torch.einsum("nde,ne->nd", chol[labels], eps), labels


def pf_ode_gaussian_isotropic(x0: torch.Tensor, s0: float, s: float, c: float) -> torch.Tensor:
    """Exact probability-flow ODE map for data N(0, c^2 I): x(s) = x(s0) sqrt((c^2 + s^2) / (c^2 + s0^2))."""
    return x0 * math.sqrt((c * c + s * s) / (c * c + s0 * s0))


def pf_ode_gaussian(x0: torch.Tensor, s0: float, s: float, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Exact probability-flow ODE map for N(mu, cov): per eigen-direction of cov the isotropic map with c^2 = ev."""
    ev, q = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))
    mu, ev, q = _as(mu, x0), _as(ev, x0), _as(q, x0)
    gain = torch.sqrt((ev + s * s) / (ev + s0 * s0))
    return (mu + ((x0.reshape(len(x0), -1) - mu) @ q * gain) @ q.T).reshape(x0.shape)


def reference_pf_ode(denoiser: Denoiser, x: torch.Tensor, sigma_from: float, sigma_to: float,
                     steps: int = 2000) -> torch.Tensor:
    """A fine reference solution of the probability-flow ODE: classical RK4 in u = log sigma, uniform steps, on
    dx/du = x - D(x; e^u) (smooth and bounded, unlike dx/dsigma at large sigma). Needs sigma_to > 0."""
    assert 0 < sigma_to < sigma_from
    u = torch.linspace(math.log(sigma_from), math.log(sigma_to), steps + 1, dtype=torch.float64).tolist()

    def f(x: torch.Tensor, u: float) -> torch.Tensor:
        return x - denoiser(x, torch.full((len(x),), math.exp(u), dtype=x.dtype, device=x.device))
    for a, b in zip(u[:-1], u[1:]):
        h = b - a
        k1 = f(x, a)
        k2 = f(x + h / 2 * k1, a + h / 2)
        k3 = f(x + h / 2 * k2, a + h / 2)
        k4 = f(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x

"""Inverse problems on a Gaussian prior, where the posterior is known in closed form.

Prior: a periodic 1-D Matérn-3/2 Gaussian random field on 48 points (one channel, non-diagonal covariance,
eigenvalues 4.5e-3 .. 11), observed at 4 points with noise std r = 0.05.
"""

import math

import pytest
import torch
from torch import nn

from trainer.diffusion.inverse import (PointObservation, dps_sample, gaussian_denoiser, gaussian_posterior,
                                       random_points)

N = 48
R = 0.05
F64 = torch.float64


def edm_sigmas(n: int, s_min: float = 0.002, s_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM (Karras et al. 2022) eq. 5: s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0."""
    i = torch.arange(n, dtype=F64)
    s = (s_max ** (1 / rho) + i / (n - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=F64)])


def heun(denoiser, x, sigmas):
    """EDM Algorithm 1 (deterministic Heun), written independently of dps_sample."""
    ones = torch.ones(x.shape[0], dtype=x.dtype)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, s * ones)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            x_next = x + (s_next - s) * (d + (x_next - denoiser(x_next, s_next * ones)) / s_next) / 2
        x = x_next
    return x


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    grid = torch.arange(N, dtype=F64) / N
    dist = (grid[:, None] - grid[None, :]).abs()
    dist = torch.minimum(dist, 1 - dist)
    a = math.sqrt(3) * dist / 0.1
    S = (1 + a) * torch.exp(-a) + 1e-3 * torch.eye(N, dtype=F64)
    mu = 0.5 * torch.sin(2 * math.pi * grid)
    obs = PointObservation(torch.tensor([5, 17, 29, 41]), (1, N))
    A = obs.matrix()
    truth = mu + torch.linalg.cholesky(S) @ torch.randn(N, generator=g, dtype=F64)
    y = A @ truth + R * torch.randn(obs.m, generator=g, dtype=F64)
    mu_p, S_p = gaussian_posterior(mu, S, A, y, R)
    return dict(S=S, mu=mu, obs=obs, A=A, y=y, mu_p=mu_p, S_p=S_p, g=g)


def test_point_observation():
    obs = PointObservation(torch.tensor([0, 7, 13]), (2, 3, 4))
    x = torch.randn(5, 2, 3, 4, dtype=F64)
    assert torch.equal(obs.observe(x), x.reshape(5, -1) @ obs.matrix().T)
    y = torch.randn(5, 3, dtype=F64)
    # scatter is the adjoint: <A x, y> = <x, A^T y>
    assert torch.allclose((obs.observe(x) * y).sum(), (x * obs.scatter(y)).sum(), rtol=1e-13)
    assert torch.isnan(obs.scatter(y, fill=math.nan)).sum() == 5 * (24 - 3)


def test_random_points():
    obs = random_points((1, 32, 32), 0.03, torch.Generator().manual_seed(1))
    assert obs.m == round(0.03 * 1024) and obs.indices.unique().numel() == obs.m
    again = random_points((1, 32, 32), 0.03, torch.Generator().manual_seed(1))
    assert torch.equal(obs.indices, again.indices)
    assert random_points((1, 8), 1e-6).m == 1 and random_points((1, 8), 1.0).m == 8


@pytest.mark.parametrize("call, word", [
    (lambda: random_points((1, 8), 0.0), "fraction"),
    (lambda: random_points((1, 8), 1.5), "fraction"),
    (lambda: PointObservation(torch.tensor([0, 8]), (1, 8)), "indices"),
    (lambda: PointObservation(torch.tensor([-1]), (1, 8)), "indices"),
    (lambda: PointObservation(torch.tensor([1, 1]), (1, 8)), "indices"),
    (lambda: PointObservation(torch.tensor([0.5]), (1, 8)), "indices"),
    (lambda: PointObservation(torch.tensor([0]), (1, 8)).observe(torch.zeros(2, 1, 9)), "x"),
    (lambda: gaussian_posterior(torch.zeros(2), torch.eye(2), torch.eye(2), torch.zeros(2), -1.0), "r"),
])
def test_user_errors(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_gaussian_posterior_matches_information_form(problem):
    """Kalman form == S_p = (S^-1 + A^T A / r^2)^-1, mu_p = S_p (S^-1 mu + A^T y / r^2), inverted directly."""
    S, mu, A, y = problem["S"], problem["mu"], problem["A"], problem["y"]
    S_inv = torch.linalg.inv(S)
    S_p = torch.linalg.inv(S_inv + A.T @ A / R**2)
    mu_p = S_p @ (S_inv @ mu + A.T @ y / R**2)
    assert torch.allclose(problem["S_p"], S_p, atol=1e-10)
    assert torch.allclose(problem["mu_p"], mu_p, atol=1e-10)
    # Batched observations give one posterior mean per row.
    mu_b, _ = gaussian_posterior(mu, S, A, torch.stack([y, 2 * y]), R)
    assert torch.allclose(mu_b[0], mu_p, atol=1e-10)


def test_gaussian_posterior_exact_observations(problem):
    """r = 0 (no S_p inverse exists): the posterior interpolates y, with zero variance at the points."""
    S, mu, A, y = problem["S"], problem["mu"], problem["A"], problem["y"]
    mu_p, S_p = gaussian_posterior(mu, S, A, y, 0.0)
    assert torch.allclose(A @ mu_p, y, atol=1e-12)
    assert (A @ S_p).abs().max() < 1e-12
    assert torch.linalg.eigvalsh(S_p).min() > -1e-12


def test_gaussian_denoiser_matches_formula(problem):
    """D(x; s) = mu + S (S + s^2 I)^-1 (x - mu), a different s per sample, float64."""
    S, mu = problem["S"], problem["mu"]
    x = torch.randn(3, 1, N, dtype=F64, generator=problem["g"])
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=F64)
    out = gaussian_denoiser(mu, S)(x, sigma)
    assert out.dtype == F64 and out.shape == x.shape
    for b in range(3):
        ref = mu + S @ torch.linalg.solve(S + sigma[b] ** 2 * torch.eye(N, dtype=F64), x[b, 0] - mu)
        assert torch.allclose(out[b, 0], ref, atol=1e-11)


def _pushforward(denoiser, mu0, cov0, sigmas):
    """Mean and covariance of heun(x0) for x0 ~ N(mu0, cov0): the sampler is affine on Gaussian data."""
    chol = torch.linalg.cholesky(cov0)
    rows = torch.cat([mu0[None], mu0[None] + chol.T])                 # mean, then mean + columns of chol
    out = heun(denoiser, rows[:, None], sigmas)[:, 0]
    gain = out[1:] - out[0]                                            # rows: (map's linear part) @ chol
    return out[0], gain.T @ gain


def test_exact_posterior_sampling_is_exact(problem):
    """The exact posterior denoiser pushes N(mu_p, S_p + s_max^2 I) to N(mu_p, S_p): no Monte Carlo.

    Only Heun's discretisation error remains: relative Frobenius error of the covariance 2.1e-2 (32
    steps), 5.0e-3 (64), second order.
    """
    mu_p, S_p = problem["mu_p"], problem["S_p"]
    errors = []
    for n in (32, 64):
        sigmas = edm_sigmas(n)
        eye = torch.eye(N, dtype=F64)
        mean, cov = _pushforward(gaussian_denoiser(mu_p, S_p), mu_p, S_p + sigmas[0] ** 2 * eye, sigmas)
        assert torch.allclose(mean, mu_p, atol=1e-12)
        errors.append(float((cov - S_p).norm() / S_p.norm()))
    print(f"\nexact-posterior Heun: covariance rel. error {errors[0]:.2e} (32 steps), {errors[1]:.2e} (64)")
    assert errors[1] < 1e-2
    assert 3 < errors[0] / errors[1] < 5.5                             # order 2: ratio 4


def test_exact_posterior_sampling_with_churn(problem):
    """dps_sample with zeta = 0 and EDM churn, exact posterior denoiser: samples from N(mu_p, S_p).

    Monte Carlo, B = 4000: the mean at each point is within 5 standard errors sqrt(S_p,ii / B); the sample
    variance's relative std is sqrt(2 / B) = 0.022, and 0.15 leaves room for the 48-point maximum (~3 sd)
    plus the discretisation error (measured: variance ratios in 0.96 .. 1.08).
    """
    mu_p, S_p, obs, y = problem["mu_p"], problem["S_p"], problem["obs"], problem["y"]
    sigmas, b = edm_sigmas(64), 4000
    g = torch.Generator().manual_seed(3)
    x0 = mu_p + torch.randn(b, N, dtype=F64, generator=g) @ torch.linalg.cholesky(
        S_p + sigmas[0] ** 2 * torch.eye(N, dtype=F64)).T
    out = dps_sample(gaussian_denoiser(mu_p, S_p), x0[:, None], sigmas, obs, y, 0.0, s_churn=20.0,
                     generator=g)[:, 0]
    assert ((out.mean(0) - mu_p).abs() / (S_p.diagonal() / b).sqrt()).max() < 5
    assert ((out.var(0) / S_p.diagonal()) - 1).abs().max() < 0.15


def test_dps_zeta_zero_is_heun(problem):
    S, mu, obs, y = problem["S"], problem["mu"], problem["obs"], problem["y"]
    x0 = 80 * torch.randn(6, 1, N, dtype=F64, generator=problem["g"])
    sigmas, denoiser = edm_sigmas(16), gaussian_denoiser(mu, S)
    assert torch.allclose(dps_sample(denoiser, x0, sigmas, obs, y, 0.0), heun(denoiser, x0, sigmas), atol=1e-12)


class GaussianDenoiserNet(nn.Module):
    """The prior's exact denoiser as a network with trainable parameters, to test autograd through one."""

    def __init__(self, mu, S):
        super().__init__()
        lam, U = torch.linalg.eigh(S)
        self.mu, self.lam = nn.Parameter(mu.clone()), nn.Parameter(lam)
        self.basis = nn.Linear(N, N, bias=False, dtype=F64)
        self.basis.weight.data.copy_(U.T)

    def forward(self, x, sigma):
        z = self.basis(x - self.mu) * self.lam / (self.lam + sigma[:, None, None] ** 2)
        return self.mu + z @ self.basis.weight


def test_dps_through_a_network(problem):
    """An nn.Module denoiser gives the analytic one's DPS samples, and leaves its parameters' grads alone."""
    S, mu, obs, y = problem["S"], problem["mu"], problem["obs"], problem["y"]
    net = GaussianDenoiserNet(mu, S)
    x0 = 80 * torch.randn(8, 1, N, dtype=F64, generator=problem["g"])
    for second_order in (False, True):
        out_net = dps_sample(net, x0, edm_sigmas(24), obs, y, 1.0, second_order=second_order)
        out = dps_sample(gaussian_denoiser(mu, S), x0, edm_sigmas(24), obs, y, 1.0, second_order=second_order)
        assert torch.allclose(out_net, out, atol=1e-9)
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():                                              # guidance still gets its gradient
        assert torch.allclose(dps_sample(net, x0, edm_sigmas(24), obs, y, 1.0), out_net, atol=1e-12)


def test_dps_bias_with_exact_prior_denoiser(problem):
    """DPS is approximate: report its bias against the exact posterior, assert only what must hold.

    B = 2000 samples from N(mu, S + s_max^2 I), 128 Heun steps, zeta in {0.3, 1, 3}. Must hold: finite
    samples whose mean fits the 4 observations far better than the prior mean does (< 0.1 of the prior's
    error) and lies closer to mu_p than mu does. The measured bias is printed (run with -s).
    """
    S, mu, obs, A, y, mu_p, S_p = (problem[k] for k in ("S", "mu", "obs", "A", "y", "mu_p", "S_p"))
    sigmas, b = edm_sigmas(128), 2000
    g = torch.Generator().manual_seed(4)
    x0 = mu + torch.randn(b, N, dtype=F64, generator=g) @ torch.linalg.cholesky(
        S + sigmas[0] ** 2 * torch.eye(N, dtype=F64)).T
    observed = torch.zeros(N, dtype=torch.bool)
    observed[obs.indices] = True
    prior_obs_err = (A @ mu - y).abs().max()
    print(f"\nDPS, 128 Heun steps, B={b}; prior mean: |A mu - y|_max {prior_obs_err:.3f}")
    print("zeta  |A mean - y|_max  |mean - mu_p|/|mu - mu_p| (MC part)  var/S_p,ii unobserved: median [min, max]"
          "  observed: min..max")
    for zeta in (0.3, 1.0, 3.0):
        out = dps_sample(gaussian_denoiser(mu, S), x0[:, None], sigmas, obs, y, zeta)[:, 0]
        assert torch.isfinite(out).all()
        mean, var = out.mean(0), out.var(0)
        obs_err = (A @ mean - y).abs().max()
        mean_err = (mean - mu_p).norm() / (mu - mu_p).norm()
        mc_err = (var.sum() / b).sqrt() / (mu - mu_p).norm()
        free, at_obs = (var / S_p.diagonal())[~observed], (var / S_p.diagonal())[observed]
        print(f"{zeta:4}  {obs_err:16.4f}  {mean_err:26.3f} ({mc_err:.3f})  {free.median():6.2f} "
              f"[{free.min():.2f}, {free.max():.2f}]  {at_obs.min():8.1f}..{at_obs.max():.1f}")
        assert obs_err < 0.1 * prior_obs_err
        assert mean_err < 1

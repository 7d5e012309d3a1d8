"""Diffusion samplers of unnormalised densities against analytic answers (float64 throughout).

Target pi = e^c N(m, s^2 I), so log Z = c. The sampler's forward policy is exact when its path measure is
Q = P_ref(path) pi(x_T) / (Z p_ref(x_T)), the reference conditioned on ending at the target; then
log w = log R + sum log p_B - sum log p_F = log Z on every path, not only on average.

Brownian reference (x_0 = 0, P_ref = sigma W at t_k, p_ref(x_1) = N(0, sigma^2 I)). Q's marginal at t is the bridge
from 0 to x_1 ~ N(m, s^2): q_t = N(t m, t D(t)), D(t) = sigma^2 (1 - t) + s^2 t. With h_t = q_t / N(0, sigma^2 t),
Q(x_{k+1} | x_k) is proportional to N(x_{k+1}; x_k, sigma^2 dt) h_{k+1}(x_{k+1}); completing the square
(using D_{k+1} + dt (sigma^2 - s^2) = D_k) gives
    mean x_k + dt u*(t_k, x_k),   u*(t, x) = (sigma^2 m + (s^2 - sigma^2) x) / D(t) = sigma^2 grad log h_t(x),
    variance sigma^2 dt D_{k+1} / D_k.
So the exact kernel is Euler's step with the continuous-time Foellmer drift plus log_var = log(D_{k+1} / D_k); without
that correction the steps differ only in variance (ratio rho_k = D_k / D_{k+1}) and
    log Z - ELBO = KL(P_F || Q) = d/2 sum_k (rho_k - 1 - log rho_k),
    EUBO - log Z = KL(Q || P_F) = d/2 sum_k (1/rho_k - 1 + log rho_k),
both ~ d (s^2 - sigma^2)^2 / (4 sigma^2 s^2 T): first order in dt (zero if s = sigma, hence s != sigma here).

OU reference (DDS; lambda = e^{-beta dt}, Lambda(t) = e^{-beta (1 - t)}): q_t = N(Lambda m, E(t)),
E = sigma^2 + Lambda^2 (s^2 - sigma^2); the same completion of squares (lambda^2 E_{k+1} + (1 - lambda^2) sigma^2 = E_k)
gives variance sigma^2 alpha E_{k+1} / E_k and, in the DDS parameterisation mean = lambda x + 2 sigma^2 (1 - lambda) f,
    f(t_k, x) = (1 + lambda)/2 Lambda_{k+1} (sigma^2 m + (s^2 - sigma^2) Lambda_k x) / (sigma^2 E_k).
x_0 ~ N(0, sigma^2 I) rather than q_0, so log w = log Z + log q_0(x_0) - log N(x_0; 0, sigma^2 I), which vanishes as
e^{-beta}.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from trainer.density import estimators as est
from trainer.density import objectives as obj
from trainer.density import sde

F64 = torch.float64
SIGMA, S, C = 1.0, 2.0, 1.7           # reference scale, target std, log Z
M = torch.tensor([1.0, -0.5], dtype=F64)
DIM = 2
ORDER_TS = (8, 16, 32, 64)


class GaussianTarget:
    """e^{log_z} N(mean, std^2 I)."""

    def __init__(self, mean: torch.Tensor, std: float, log_z: float):
        self.mean, self.std, self.log_z, self.dim = mean, std, log_z, mean.numel()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_z + sde.gaussian_log_prob(x, self.mean.to(x), self.std ** 2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean + self.std * torch.randn(n, self.dim, generator=generator, dtype=F64)


TARGET = GaussianTarget(M, S, C)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brownian_policy(T: int, correct_variance: bool = True, shift: torch.Tensor | float = 0.0):
    """Euler + Foellmer drift u*; with the variance correction, the exact kernel; `shift` perturbs the drift."""
    v2, s2 = SIGMA ** 2, S ** 2

    def D(t):
        return (v2 * (1 - t) + s2 * t)[:, None]

    def policy(t, x):
        drift = (v2 * M + (s2 - v2) * x) / D(t) + shift
        return drift, (torch.log(D(t + 1 / T) / D(t)).expand_as(x) if correct_variance else None)
    return policy


def _lams(T: int, beta: float | None, b2) -> torch.Tensor:
    """(T+1,) Lambda_k = prod_{j >= k} lambda_j (Lambda_T = 1) for the schedule b2 (default: constant beta)."""
    b2 = sde.ou_constant(T, beta) if b2 is None else b2
    lam = torch.tensor([math.sqrt(1 - v) for v in b2], dtype=F64)
    return torch.cat([lam.flip(0).cumprod(0).flip(0), torch.ones(1, dtype=F64)]), lam


def ou_policy(T: int, beta: float | None, correct_variance: bool = True, b2=None):
    """The exact DDS kernel for the schedule b2 (default: constant beta; lambda_k -> lambda, Lambda_k -> Lambda(t_k)
    in the module docstring); without the variance correction (constant beta only), the continuous-time
    f* = grad log h_t at t_k."""
    v2, s2 = SIGMA ** 2, S ** 2
    Lams, lam = _lams(T, beta, b2)

    def E(L):
        return v2 + L ** 2 * (s2 - v2)

    def policy(t, x):
        k = (t * T).round().long()
        Lk, Lk1 = Lams[k][:, None], Lams[k + 1][:, None]
        core = (v2 * M + (s2 - v2) * Lk * x) / (v2 * E(Lk))
        if not correct_variance:
            return Lk * core, None
        return (1 + lam[k][:, None]) / 2 * Lk1 * core, torch.log(E(Lk1) / E(Lk)).expand_as(x)
    return policy


def ou_prior_mismatch(x0: torch.Tensor, beta: float | None, T: int = 1, b2=None) -> torch.Tensor:
    lam0 = _lams(T, beta, b2)[0][0].item()
    e0 = SIGMA ** 2 + lam0 ** 2 * (S ** 2 - SIGMA ** 2)
    return sde.gaussian_log_prob(x0, lam0 * M, e0) - sde.gaussian_log_prob(x0, 0.0, SIGMA ** 2)


def forward_log_w(policy, n, T, seed=0, **kw):
    tr = sde.simulate_forward(policy, n, T, SIGMA, gen(seed), dim=DIM, dtype=F64, **kw)
    return est.log_weights(tr.log_pf, tr.log_pb, TARGET.log_prob(tr.x[:, -1])), tr


def backward_log_w(policy, n, T, seed=1, **kw):
    tr = sde.simulate_backward(policy, TARGET.sample(n, gen(seed)), T, SIGMA, gen(seed + 1), **kw)
    return est.log_weights(tr.log_pf, tr.log_pb, TARGET.log_prob(tr.x[:, -1])), tr


def assert_all_exact(log_w_f, log_w_b, tol=1e-9):
    assert (log_w_f - C).abs().max() < tol and (log_w_b - C).abs().max() < tol
    assert abs(est.elbo(log_w_f) - C) < tol
    assert abs(est.importance_log_z(log_w_f) - C) < tol
    assert abs(est.eubo(log_w_b) - C) < tol
    assert abs(est.ess(log_w_f) - 1) < tol


# 1. Brownian reference (PIS / TB / VarGrad)

@pytest.mark.parametrize("T", [1, 5, 32])
def test_brownian_exact_kernel_gives_log_z_on_every_path(T):
    log_w_f, tr = forward_log_w(brownian_policy(T), 400, T)
    log_w_b, bt = backward_log_w(brownian_policy(T), 400, T)
    assert tr.x.shape == (400, T + 1, DIM) and tr.log_pf.shape == tr.log_pb.shape == (400, T)
    assert (tr.x[:, 0] == 0).all() and (bt.x[:, 0] == 0).all() and (tr.log_pb[:, 0] == 0).all()
    assert_all_exact(log_w_f, log_w_b)


def test_exploration_moves_samples_not_the_density():
    T, n = 16, 4000
    log_w, tr = forward_log_w(brownian_policy(T), n, T, exploration_std=0.3)
    assert (log_w - C).abs().max() < 1e-9   # p_F is the policy's density, exploration excluded
    _, plain = forward_log_w(brownian_policy(T), n, T)
    # Exploration adds 0.3^2 per step, T steps in all; the exact sampler's x_T has variance S^2 per coordinate.
    var_expl, var_plain = tr.x[:, -1].var(0), plain.x[:, -1].var(0)
    assert torch.allclose(var_plain, torch.full((DIM,), S ** 2, dtype=F64), rtol=0.1)
    assert (var_expl > var_plain + 0.5 * T * 0.3 ** 2).all()


def test_exact_sampler_marginals():
    T, n = 16, 20000
    _, tr = forward_log_w(brownian_policy(T), n, T)
    x1 = tr.x[:, -1]
    se = S / math.sqrt(n)
    assert ((x1.mean(0) - M).abs() < 5 * se).all()
    assert ((x1.var(0) - S ** 2).abs() < 5 * S ** 2 * math.sqrt(2 / n)).all()
    # Backward from exact samples: x_k | x_1 is the bridge N(t_k x_1, sigma^2 t_k (1 - t_k)).
    _, bt = backward_log_w(brownian_policy(T), n, T)
    k = T // 4
    t = k / T
    resid = bt.x[:, k] - t * bt.x[:, -1]
    assert ((resid.var(0) / (SIGMA ** 2 * t * (1 - t)) - 1).abs() < 5 * math.sqrt(2 / n)).all()


@pytest.mark.parametrize("reference", ["brownian", "ou"])
def test_given_noise_makes_rows_independent_of_the_batch_split(reference):
    T, n, beta = 6, 10, 2.0
    eps = torch.randn(T + 1, n, DIM, generator=gen(4), dtype=F64)
    pol = brownian_policy(T) if reference == "brownian" else ou_policy(T, beta)
    kw = dict(dim=DIM, dtype=F64, reference=reference, ou_beta=beta)
    full = sde.simulate_forward(pol, n, T, SIGMA, noise=lambda k: eps[k + 1], **kw)
    head = sde.simulate_forward(pol, 4, T, SIGMA, noise=lambda k: eps[k + 1, :4], **kw)
    tail = sde.simulate_forward(pol, 6, T, SIGMA, noise=lambda k: eps[k + 1, 4:], **kw)
    for a, b, c in zip(full, head, tail):
        assert torch.equal(a, torch.cat([b, c]))
    with pytest.raises(ValueError, match="'noise'"):
        sde.simulate_forward(pol, n, T, SIGMA, noise=lambda k: eps[k + 1, :3], **kw)


def _brownian_gaps(T: int, n: int):
    pol = brownian_policy(T, correct_variance=False)
    log_w_f, _ = forward_log_w(pol, n, T, seed=T)
    log_w_b, _ = backward_log_w(pol, n, T, seed=T + 1)
    t = sde.time_grid(T, F64)
    D = SIGMA ** 2 * (1 - t) + S ** 2 * t
    rho = D[:-1] / D[1:]
    kl_fwd = DIM / 2 * (rho - 1 - rho.log()).sum().item()
    kl_bwd = DIM / 2 * (1 / rho - 1 + rho.log()).sum().item()
    return {"elbo_gap": C - est.elbo(log_w_f).item(), "eubo_gap": est.eubo(log_w_b).item() - C,
            "elbo_se": log_w_f.std().item() / math.sqrt(n), "eubo_se": log_w_b.std().item() / math.sqrt(n),
            "kl_fwd": kl_fwd, "kl_bwd": kl_bwd, "ess": est.ess(log_w_f).item()}


def test_foellmer_drift_without_variance_correction_is_first_order():
    """Measured (n = 40000, T = 8, 16, 32, 64): log Z - ELBO = 0.1274, 0.0659, 0.0331, 0.0184 (analytic 0.1298,
    0.0676, 0.0345, 0.0174; standard errors 0.0024 to 0.0009), EUBO - log Z = 0.1522, 0.0741, 0.0343, 0.0175
    (analytic 0.1515, 0.0731, 0.0358, 0.0178). Fitted orders: 0.94 and 1.05 measured, 0.967 and 1.031 analytic
    (T gap -> d (s^2 - sigma^2)^2 / (4 sigma^2 s^2) = 1.125: 1.1223 and 1.1277 at T = 256)."""
    n = 40000
    rows = [_brownian_gaps(T, n) for T in ORDER_TS]
    for r in rows:
        # ELBO < log Z < EUBO, and each gap is the analytic KL within 5 standard errors.
        assert r["elbo_gap"] > 5 * r["elbo_se"] and r["eubo_gap"] > 5 * r["eubo_se"]
        assert abs(r["elbo_gap"] - r["kl_fwd"]) < 5 * r["elbo_se"]
        assert abs(r["eubo_gap"] - r["kl_bwd"]) < 5 * r["eubo_se"]
        assert 0 < r["ess"] < 1
    logT = np.log(ORDER_TS)
    for key, tol in (("kl_fwd", 0.06), ("kl_bwd", 0.06), ("elbo_gap", 0.15), ("eubo_gap", 0.15)):
        order = -np.polyfit(logT, np.log([r[key] for r in rows]), 1)[0]
        assert abs(order - 1) < tol, (key, order, [r[key] for r in rows])


# 2. OU reference (DDS)

def test_ou_exact_kernel_up_to_the_prior_mismatch():
    T, beta, n = 20, 2.0, 400
    log_w_f, tr = forward_log_w(ou_policy(T, beta), n, T, reference="ou", ou_beta=beta)
    log_w_b, bt = backward_log_w(ou_policy(T, beta), n, T, reference="ou", ou_beta=beta)
    for log_w, path in ((log_w_f, tr), (log_w_b, bt)):
        mismatch = ou_prior_mismatch(path.x[:, 0], beta, T)
        assert mismatch.abs().max() > 1e-3            # beta = 2 remembers x_0: the correction is needed
        assert (log_w - mismatch - C).abs().max() < 1e-9


@pytest.mark.parametrize("T", [1, 20])
def test_ou_exact_kernel_gives_log_z_once_the_reference_forgets_x0(T):
    beta = 30.0   # e^-30 ~ 1e-13
    log_w_f, _ = forward_log_w(ou_policy(T, beta), 400, T, reference="ou", ou_beta=beta)
    log_w_b, _ = backward_log_w(ou_policy(T, beta), 400, T, reference="ou", ou_beta=beta)
    assert_all_exact(log_w_f, log_w_b)


@pytest.mark.parametrize("T", [2, 24])
def test_ou_cos_sq_exact_kernel_up_to_the_prior_mismatch(T):
    """DDS's cos_sq steps (down to b_k^2 ~ 1e-66 at the last one) with the exact kernel: log w = log Z on every path
    up to the prior mismatch, forwards and backwards, so the reference-relative log densities stay exact there."""
    b2 = sde.ou_cos_sq(T, alpha=1.5, tfinal=6.4)     # alpha^2 tfinal = 14.4: the reference forgets x_0 to ~e^-7
    log_w_f, tr = forward_log_w(ou_policy(T, None, b2=b2), 400, T, reference="ou", ou_noise=b2)
    log_w_b, bt = backward_log_w(ou_policy(T, None, b2=b2), 400, T, reference="ou", ou_noise=b2)
    for log_w, path in ((log_w_f, tr), (log_w_b, bt)):
        assert (log_w - ou_prior_mismatch(path.x[:, 0], None, T, b2) - C).abs().max() < 1e-9


def test_ou_cos_sq_exact_kernel_in_float32():
    """The same in float32 at T = 100, where the last steps' noise (b_k ~ 1e-33 .. 1e-5) is far below the states' ulp:
    written as plain Gaussian log densities these steps give NaN and O(1) errors; the reference-relative form has
    only rounding: ~1e-7 relative per term, ~100 steps of terms of size <= ~10 -> 1e-4 (measured 2e-5)."""
    T, n = 100, 2000
    b2 = sde.ou_cos_sq(T, alpha=1.5, tfinal=6.4)
    exact = ou_policy(T, None, b2=b2)

    def policy32(t, x):
        drift, log_var = exact(t.double(), x.double())
        return drift.float(), log_var.float()

    tr = sde.simulate_forward(policy32, n, T, SIGMA, gen(0), dim=DIM, dtype=torch.float32, reference="ou", ou_noise=b2)
    log_w = est.log_weights(tr.log_pf, tr.log_pb, TARGET.log_prob(tr.x[:, -1].double()).float()).double()
    assert (log_w - ou_prior_mismatch(tr.x[:, 0].double(), None, T, b2) - C).abs().max() < 1e-3


def test_ou_cos_sq_schedule():
    """The DDS code's step scheme: decreasing steps whose noise sums to alpha^2 tfinal, the last one ~0; b_0 by
    hand for DDS's Funnel settings (T = 128, alpha 0.6875, tfinal 6.4): b_0^2 = alpha^2 tfinal c_0 / sum_k c_k,
    c_0 = cos^4(phi_0) ~ 1, phi_0 = pi/2 s / (1 + s), and by the trapezoid rule (error ~ 1e-5 here)
    sum_k c_k = (T - 1) (1 + s) (2/pi) int_{phi_0}^{pi/2} cos^4 + c_0 / 2, int = 3 pi / 16 - phi_0 + 2/3 phi_0^3 + ...
    = 47.49, so b_0 = 0.2523."""
    b2 = sde.ou_cos_sq(128, 0.6875, 6.4)
    assert len(b2) == 128 and all(x > y for x, y in zip(b2, b2[1:])) and 0 < b2[-1] < 1e-60
    assert abs(sum(b2) - 0.6875 ** 2 * 6.4) < 1e-12
    s, phi0 = sde.COS_SQ_S, math.pi / 2 * sde.COS_SQ_S / (1 + sde.COS_SQ_S)
    c0 = math.cos(phi0) ** 4
    total = 127 * (1 + s) * 2 / math.pi * (3 * math.pi / 16 - phi0 + 2 / 3 * phi0 ** 3) + c0 / 2
    assert abs(b2[0] - 0.6875 ** 2 * 6.4 * c0 / total) < 1e-4 * b2[0]
    assert sde.ou_cos_sq(4, 10.0, 6.4)[0] == 1.0         # clipped at b = 1 (a fresh draw from the reference)
    with pytest.raises(ValueError, match="'ou_alpha'"):
        sde.ou_cos_sq(4, 0.0, 6.4)
    with pytest.raises(ValueError, match="'ou_noise'"):
        sde.simulate_forward(ou_policy(4, 2.0), 4, 4, SIGMA, dim=DIM, reference="ou", ou_noise=[0.1] * 3)


@pytest.mark.parametrize("learned", [False, True])
def test_ou_reference_relative_log_densities_are_the_path_density(learned):
    """sum log p_F - sum log p_B of the reference-relative columns equals the same sum of the plain Gaussian log
    densities of the path, forwards and backwards, for a policy that is not the exact one (float64 rounding)."""
    T, beta, n = 7, 3.0, 50
    lam, b2 = math.exp(-beta / T), -math.expm1(-2 * beta / T)
    var = SIGMA ** 2 * b2

    def policy(t, x):
        return 0.3 * x.flip(1) + t[:, None], (0.2 * torch.tanh(x) if learned else None)

    for tr in (sde.simulate_forward(policy, n, T, SIGMA, gen(2), dim=DIM, dtype=F64, reference="ou", ou_beta=beta),
               sde.simulate_backward(policy, TARGET.sample(n, gen(3)), T, SIGMA, gen(4), reference="ou",
                                     ou_beta=beta)):
        plain = sde.gaussian_log_prob(tr.x[:, 0], 0.0, SIGMA ** 2)
        for k in range(T):
            x, x_next = tr.x[:, k], tr.x[:, k + 1]
            drift, log_var = policy(torch.full((n,), k / T, dtype=F64), x)
            v = var if log_var is None else var * log_var.exp()
            plain = plain + sde.gaussian_log_prob(x_next, lam * x + 2 * SIGMA ** 2 * (1 - lam) * drift, v)
            plain = plain - sde.gaussian_log_prob(x, lam * x_next, var)
        assert torch.allclose(tr.log_pf.sum(1) - tr.log_pb.sum(1), plain, rtol=0, atol=1e-9)


def test_ou_continuous_time_control_brackets_log_z():
    T, beta, n = 32, 30.0, 20000
    pol = ou_policy(T, beta, correct_variance=False)
    log_w_f, _ = forward_log_w(pol, n, T, reference="ou", ou_beta=beta)
    log_w_b, _ = backward_log_w(pol, n, T, reference="ou", ou_beta=beta)
    assert C - est.elbo(log_w_f) > 5 * log_w_f.std() / math.sqrt(n)
    assert est.eubo(log_w_b) - C > 5 * log_w_b.std() / math.sqrt(n)


# 3. Objectives

def _sums(tr):
    return tr.log_pf.sum(1), tr.log_pb.sum(1), TARGET.log_prob(tr.x[:, -1])


def test_objectives_vanish_at_the_exact_policy_and_not_elsewhere():
    T, n = 16, 2000
    exact = _sums(sde.simulate_forward(brownian_policy(T), n, T, SIGMA, gen(0), dim=DIM, dtype=F64))
    off = _sums(sde.simulate_forward(brownian_policy(T, shift=0.3), n, T, SIGMA, gen(0), dim=DIM, dtype=F64))
    log_z = torch.tensor(C, dtype=F64)
    assert obj.trajectory_balance_loss(*exact, log_z) < 1e-18
    assert obj.vargrad_loss(*exact) < 1e-18
    assert abs(obj.pis_loss(*exact) + C) < 1e-9       # the loss is KL(P_F || Q) - log Z
    assert obj.trajectory_balance_loss(*off, log_z) > 1e-2
    assert obj.vargrad_loss(*off) > 1e-2
    kl = obj.pis_loss(*off) + C
    assert kl > 5 * est.log_weights(*off).std() / math.sqrt(n)
    # Wrong log Z alone: TB is its squared error, VarGrad does not see it.
    assert abs(obj.trajectory_balance_loss(*exact, log_z + 0.5) - 0.25) < 1e-9

    beta = 30.0
    ou = dict(dim=DIM, dtype=F64, reference="ou", ou_beta=beta)
    exact = _sums(sde.simulate_forward(ou_policy(T, beta), n, T, SIGMA, gen(0), **ou))
    approx = _sums(sde.simulate_forward(ou_policy(T, beta, correct_variance=False), n, T, SIGMA, gen(0), **ou))
    assert abs(obj.denoising_diffusion_sampler_loss(*exact) + C) < 1e-9
    assert obj.denoising_diffusion_sampler_loss(*approx) + C > 5 * est.log_weights(*approx).std() / math.sqrt(n)


@pytest.mark.parametrize("reference", ["brownian", "ou"])
def test_reparameterised_kl_differentiates_through_the_path(reference):
    T, n, beta = 8, 256, 3.0
    base = brownian_policy(T) if reference == "brownian" else ou_policy(T, beta)
    theta = torch.tensor([0.2, -0.1], dtype=F64, requires_grad=True)
    loss_fn = obj.pis_loss if reference == "brownian" else obj.denoising_diffusion_sampler_loss

    def policy(t, x):
        drift, log_var = base(t, x)
        return drift + theta * x, log_var

    def simulate(keep_graph=True):
        return sde.simulate_forward(policy, n, T, SIGMA, gen(5), dim=DIM, dtype=F64, reference=reference,
                                    ou_beta=beta, keep_graph=keep_graph)

    tr = simulate()
    assert tr.x.requires_grad
    (grad,) = torch.autograd.grad(loss_fn(*_sums(tr)), theta)
    assert grad.abs().min() > 1e-3
    # The same noise (same seed) makes the loss a smooth function of theta: central differences agree.
    h, fd = 1e-5, torch.zeros(2, dtype=F64)
    with torch.no_grad():
        for i in range(2):
            for sign in (1, -1):
                theta[i] += sign * h
                fd[i] += sign * loss_fn(*_sums(simulate())) / (2 * h)
                theta[i] -= sign * h
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-8)
    # Detaching the path leaves only the score term: a different gradient.
    tr = simulate(keep_graph=False)
    assert not tr.x.requires_grad
    (grad_detached,) = torch.autograd.grad(loss_fn(*_sums(tr)), theta)
    assert not torch.allclose(grad, grad_detached, rtol=0.1)


# 4. W2

def test_w2_is_the_optimal_assignment():
    g = gen(3)
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    cost = torch.cdist(x, y) ** 2
    brute = min(cost[range(6), list(p)].mean().item() for p in itertools.permutations(range(6)))
    assert abs(est.w2_squared(x, y) - brute) < 1e-12
    assert est.w2_squared(x, x) == 0


def test_w2_same_gaussian_tends_to_zero():
    """Measured: 0.34, 0.12, 0.035 at K = 64, 256, 1024 (d = 2, where E W2^2 ~ log K / K)."""
    values = []
    for K in (64, 256, 1024):
        values.append(np.mean([est.w2_squared(torch.randn(K, 2, generator=gen(s), dtype=F64),
                                              torch.randn(K, 2, generator=gen(s + 100), dtype=F64))
                               for s in range(2)]))
    assert values[0] > values[1] > values[2] and values[2] < 0.06 and values[2] < values[0] / 5


def test_w2_shifted_gaussians_against_the_closed_form():
    """W2^2(N(0, I), N(a, I)) = |a|^2. For samples X and Y = a + Z, exactly (the cross term is the same for every
    permutation): W2^2(X, Y) = |a|^2 - 2 a.(mean X - mean Z) + W2^2(X, Z); the middle term has standard deviation
    2 |a| sqrt(2 / K), the last is >= 0 and small, so |W2^2 - |a|^2| <= 4 * 2 |a| sqrt(2/K) + W2^2(X, Z)."""
    K, a = 1000, torch.tensor([1.5, -1.0], dtype=F64)
    x = torch.randn(K, 2, generator=gen(7), dtype=F64)
    z = torch.randn(K, 2, generator=gen(8), dtype=F64)
    w2, w2_same = est.w2_squared(x, a + z), est.w2_squared(x, z)
    identity = a.dot(a).item() - 2 * a.dot(x.mean(0) - z.mean(0)).item() + w2_same
    assert abs(w2 - identity) < 1e-9
    assert abs(w2 - a.dot(a).item()) < 8 * a.norm().item() * math.sqrt(2 / K) + w2_same


# 5. Bad input

@pytest.mark.parametrize("T", [0, -3, 2.5, True])
def test_bad_T(T):
    pol = brownian_policy(4)
    with pytest.raises(ValueError, match="'T'"):
        sde.simulate_forward(pol, 4, T, SIGMA, dim=DIM)
    with pytest.raises(ValueError, match="'T'"):
        sde.simulate_backward(pol, torch.zeros(4, DIM), T, SIGMA)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_sigma(sigma):
    pol = brownian_policy(4)
    with pytest.raises(ValueError, match="'sigma'"):
        sde.simulate_forward(pol, 4, 4, sigma, dim=DIM)
    with pytest.raises(ValueError, match="'sigma'"):
        sde.simulate_backward(pol, torch.zeros(4, DIM), 4, sigma, reference="ou")


def test_other_bad_input():
    pol = brownian_policy(4)
    with pytest.raises(ValueError, match="'reference'"):
        sde.simulate_forward(pol, 4, 4, SIGMA, dim=DIM, reference="dds")
    with pytest.raises(ValueError, match="'ou_beta'"):
        sde.simulate_forward(pol, 4, 4, SIGMA, dim=DIM, reference="ou", ou_beta=0.0)
    with pytest.raises(ValueError, match="'exploration_std'"):
        sde.simulate_forward(pol, 4, 4, SIGMA, exploration_std=0.1, dim=DIM, keep_graph=True)
    with pytest.raises(ValueError, match="policy returned"):
        sde.simulate_forward(lambda t, x: (x[:, :1], None), 4, 4, SIGMA, dim=DIM)
    with pytest.raises(ValueError, match="same shape"):
        est.w2_squared(torch.zeros(3, 2), torch.zeros(4, 2))

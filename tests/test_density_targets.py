"""Target densities against analytic answers: log Z by quadrature, exact samplers by moments, scores by autograd.

Quadrature error bounds used below. Trapezoid on a uniform grid of step h over a Gaussian of std s: by Poisson
summation the relative error is 2 exp(-2 pi^2 s^2 / h^2) per axis; a range reaching m std past every mean drops
mass below 2 Phi(-m). Both are far under float64 rounding here, so log Z is checked to 1e-12 (summation rounding).
Monte-Carlo checks: |estimate - exact| < 5 standard errors (two-sided 5.7e-7 per check; the seeds are fixed).
"""

import json
import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from trainer.density.targets import (MANYWELL_Z1, MOG40_MEANS, TARGETS, Target, checked_log_prob, get_target,
                                     load_user_target)

F64 = torch.float64


def grid_log_z(target, lo, hi, h):
    """log of the 2-D trapezoid sum of exp(log_prob) on [lo, hi]^2 (the integrand is ~0 on the border)."""
    t = torch.arange(lo, hi + h / 2, h, dtype=F64)
    xy = torch.cartesian_prod(t, t)
    return float(torch.logsumexp(checked_log_prob(target, xy), 0)) + 2 * math.log(h)


def within(est, exact, se, k=5.0):
    est, exact, se = (torch.as_tensor(v, dtype=F64) for v in (est, exact, se))
    assert ((est - exact).abs() <= k * se).all(), f"estimate {est} vs exact {exact}: {(est - exact) / se} SE"


def check_mean_var(x, mean, var):
    """Per-column sample mean and variance against exact ones; SE(var) from the sample's 4th central moment."""
    n = x.shape[0]
    c = x - x.mean(0)
    v, m4 = c.pow(2).mean(0), c.pow(4).mean(0)
    within(x.mean(0), mean, (v / n).sqrt())
    within(v, var, ((m4 - v**2) / n).sqrt())


# ---- log Z by quadrature --------------------------------------------------------------------------------------

def test_gmm25_log_z_by_grid_quadrature():
    t = get_target("gmm25")
    # [-16, 16]: 6 = 10.95 std past the outer means (tail < 1e-27); h = 0.25: 2 exp(-2 pi^2 0.3 / h^2) = 1e-41
    assert abs(grid_log_z(t, -16.0, 16.0, 0.25) - t.log_z) < 1e-12 and t.log_z == 0.0


def test_mog40_log_z_by_grid_quadrature_and_means_from_the_shipped_table():
    doc = json.loads(MOG40_MEANS.read_text())
    means = torch.tensor(doc["means"], dtype=F64)
    assert means.shape == (40, 2) and (means.abs() <= 40).all() and "manual_seed(0)" in doc["note"]
    # the note's recipe reproduces the table
    g = torch.Generator().manual_seed(0)
    assert torch.equal(means, torch.rand(40, 2, generator=g, dtype=F64) * 80 - 40)
    t = get_target("mog40")
    assert torch.equal(t.means, means)
    # the density is the mixture of N(mu_k, I) over this table (an independent formula)
    x = torch.randn(64, 2, dtype=F64) * 30
    ref = torch.logsumexp(-0.5 * torch.cdist(x, means).pow(2), 1) - math.log(40) - math.log(2 * math.pi)
    torch.testing.assert_close(t.log_prob(x), ref, rtol=1e-12, atol=1e-12)
    # [-52, 52]: 12 std past every mean (tail < 1e-32); h = 0.5: 2 exp(-2 pi^2 / 0.25) = 1e-34
    assert abs(grid_log_z(t, -52.0, 52.0, 0.5) - t.log_z) < 1e-12


def test_gaussian_with_offset_log_z_by_grid_quadrature():
    t = get_target("gaussian", mu=[1.0, -2.0], std=0.7, dim=2, log_z=1.5)
    # mu +- 12 std covered: [-10.4, 9.4] in [-11, 11]; h = 0.1: 2 exp(-2 pi^2 0.49 / 0.01) = 0
    assert abs(grid_log_z(t, -11.0, 11.0, 0.1) - 1.5) < 1e-12 and t.log_z == 1.5


@pytest.mark.parametrize("name, x0_var", [("funnel", 9.0), ("funnel_easy", 1.0)])
def test_funnel_log_z_analytic_in_x_rest_then_quadrature_in_x0(name, x0_var):
    t = get_target(name)
    d = t.dim
    assert d == 10 and t.log_z == 0.0
    # x_{1:} | x0 is N(0, e^{x0} I): log_prob(x) - log_prob(x0, 0) = -|x_{1:}|^2 e^{-x0} / 2 at random points
    x = torch.randn(256, d, dtype=F64) * 3
    x0 = x[:, :1]
    at0 = torch.cat([x0, torch.zeros(256, d - 1, dtype=F64)], 1)
    torch.testing.assert_close(t.log_prob(x) - t.log_prob(at0), -0.5 * torch.exp(-x0[:, 0]) * x[:, 1:].pow(2).sum(1),
                               rtol=1e-12, atol=1e-9)
    # so the x0 marginal is log_prob(x0, 0) + (d-1)/2 (log 2 pi + x0); trapezoid over x0 in +-12 std, h = 0.02
    s = math.sqrt(x0_var)
    g = torch.arange(-12 * s, 12 * s + 0.01, 0.02, dtype=F64)[:, None]
    log_m = t.log_prob(torch.cat([g, torch.zeros(len(g), d - 1, dtype=F64)], 1)) + 0.5 * (d - 1) * (
        math.log(2 * math.pi) + g[:, 0])
    log_z = float(torch.logsumexp(log_m, 0)) + math.log(0.02)
    assert abs(log_z - t.log_z) < 1e-12
    var_x0 = float((torch.exp(log_m - log_z) * g[:, 0] ** 2).sum() * 0.02)
    assert abs(var_x0 - x0_var) < 1e-10   # std 3 for 'funnel' (Sendera et al.), 1 for PIS's 'funnel_easy'


def test_manywell_log_z_by_1d_quadrature():
    # the 1-D factor from its formula: Z1 = 11784.509265... (DIFFUSION.md; gfn-diffusion's 11784.50927)
    f = lambda u: math.exp(-u**4 + 6 * u**2 + 0.5 * u)  # noqa: E731
    z1, err = integrate.quad(f, -6, 6, points=[-1.7, 0.0, 1.7], epsabs=0, epsrel=1e-13, limit=200)
    assert abs(z1 / 11784.509265 - 1) < 1e-8 and abs(z1 / MANYWELL_Z1 - 1) < 1e-13
    t = get_target("manywell")
    d = t.dim
    assert d == 32

    def lp(**coords):   # the target's log_prob at one point, all other coordinates 0
        x = torch.zeros(1, d, dtype=F64)
        for k, v in coords.items():
            x[0, int(k[1:])] = v
        return float(t.log_prob(x)[0])

    # 16 independent identical pairs (2i, 2i+1), each separable in x1 and x2, and 0 at the origin
    x, idx = torch.randn(64, d, dtype=F64) * 1.5, torch.arange(d)
    only = lambda keep: t.log_prob(torch.where(keep, x, 0.0))  # noqa: E731
    torch.testing.assert_close(t.log_prob(x), sum(only(idx == k) for k in range(d)), rtol=1e-12, atol=1e-10)
    pair0 = torch.zeros(64, d, dtype=F64)
    pair0[:, :2] = x[:, :2]
    for i in range(1, 16):
        torch.testing.assert_close(t.log_prob(pair0.roll(2 * i, 1)), t.log_prob(pair0), rtol=1e-14, atol=0)
    assert lp() == 0.0
    # Z of one pair from the target itself, by quadrature of each factor (tails beyond |x| = 6 are below e^-400)
    z1_t = integrate.quad(lambda u: math.exp(lp(c0=u)), -6, 6, points=[-1.7, 0.0, 1.7], epsabs=0, epsrel=1e-13,
                          limit=200)[0]
    z2_t = integrate.quad(lambda u: math.exp(lp(c1=u)), -12, 12, epsabs=0, epsrel=1e-13, limit=200)[0]
    log_z = 16 * (math.log(z1_t) + math.log(z2_t))
    assert abs(log_z - t.log_z) < 1e-9 and abs(log_z - 164.6957) < 1e-4
    assert abs(z2_t / math.sqrt(2 * math.pi) - 1) < 1e-12


# ---- exact samplers -------------------------------------------------------------------------------------------

def mixture_checks(t, n, seed):
    x = t.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert x.shape == (n, 2) and x.dtype == F64
    mu, s2 = t.means, t.std**2
    check_mean_var(x, mu.mean(0), mu.var(0, unbiased=False) + s2)
    # component frequencies: E_p[r_k(x)] = 1/K exactly for the responsibilities r_k (an independent formula)
    r = torch.softmax(-0.5 * torch.cdist(x, mu).pow(2) / s2, 1)
    within(r.mean(0), 1 / len(mu), r.std(0) / math.sqrt(n))
    # jointly: Hotelling's T^2 of the first K-1 (sum r = 1) is chi^2_{K-1} for large n; reject at p < 1e-4
    dev = r[:, :-1].mean(0) - 1 / len(mu)
    t2 = float(dev @ torch.linalg.solve(torch.cov(r[:, :-1].T) / n, dev))
    assert t2 < stats.chi2.ppf(1 - 1e-4, len(mu) - 1), t2


def test_gmm25_sampler():
    mixture_checks(get_target("gmm25"), 50_000, 0)


def test_mog40_sampler():
    mixture_checks(get_target("mog40"), 50_000, 1)


@pytest.mark.parametrize("name, s", [("funnel", 3.0), ("funnel_easy", 1.0)])
def test_funnel_sampler(name, s):
    n = 50_000
    x = get_target(name).sample(n, generator=torch.Generator().manual_seed(2), dtype=F64)
    check_mean_var(x[:, :1], [0.0], [s**2])
    z = x[:, 1:] * torch.exp(-0.5 * x[:, :1])     # exactly N(0, 1), independent of x0
    check_mean_var(z, torch.zeros(9), torch.ones(9))
    within(torch.corrcoef(torch.stack([x[:, 0], z[:, 0]]))[0, 1], 0.0, 1 / math.sqrt(n))


def test_manywell_sampler_matches_the_1d_law():
    n = 20_000
    x = get_target("manywell").sample(n, generator=torch.Generator().manual_seed(3), dtype=F64)
    x1, x2 = x[:, 0::2], x[:, 1::2]
    # moments of x1 by quadrature of exp(-u^4 + 6u^2 + u/2)
    m = [integrate.quad(lambda u, k=k: u**k * math.exp(-u**4 + 6 * u**2 + 0.5 * u), -6, 6, points=[-1.7, 0.0, 1.7],
                        epsabs=0, epsrel=1e-12)[0] / MANYWELL_Z1 for k in (1, 2)]
    check_mean_var(x1, torch.full((16,), m[0]), torch.full((16,), m[1] - m[0]**2))
    check_mean_var(x2, torch.zeros(16), torch.ones(16))
    # the whole law: Kolmogorov-Smirnov of all 320k x1 draws against the CDF by cumulative trapezoid (h = 1e-4,
    # error ~1e-9, far below the KS resolution 1/sqrt(n) = 2e-3); p > 1e-3
    u = np.linspace(-4, 4, 80_001)
    cdf = integrate.cumulative_trapezoid(np.exp(-u**4 + 6 * u**2 + 0.5 * u), u, initial=0)
    assert abs(cdf[-1] / MANYWELL_Z1 - 1) < 1e-8
    p = stats.kstest(x1.flatten().numpy(), lambda v: np.interp(v, u, cdf / cdf[-1])).pvalue
    assert p > 1e-3, p
    # wells are independent
    within(torch.corrcoef(torch.stack([x1[:, 0], x1[:, 1]]))[0, 1], 0.0, 1 / math.sqrt(n))


def test_gaussian_sampler_and_sample_arguments():
    t = get_target("gaussian", mu=[1.0, -2.0, 0.5], std=0.7, dim=3)
    x = t.sample(50_000, generator=torch.Generator().manual_seed(4), dtype=F64)
    check_mean_var(x, [1.0, -2.0, 0.5], [0.49] * 3)
    assert t.sample(3).dtype == torch.get_default_dtype() and t.sample(0).shape == (0, 3)
    a, b = (t.sample(5, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="target 'gaussian': sample count n = -1"):
        t.sample(-1)


# ---- scores ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TARGETS))
def test_closed_form_scores_match_autograd(name):
    t = get_target(name)
    x = torch.cat([t.sample(32, generator=torch.Generator().manual_seed(5), dtype=F64),
                   torch.randn(32, t.dim, dtype=F64)])
    auto = Target.grad_log_prob(t, x)   # the default: autograd through log_prob
    assert auto.dtype == F64 and auto.shape == x.shape
    torch.testing.assert_close(t.grad_log_prob(x), auto, rtol=1e-10, atol=1e-10)
    assert t.log_prob(x.float()).dtype == torch.float32 and Target.grad_log_prob(t, x.float()).dtype == torch.float32


def test_autograd_score_against_written_out_formulas():
    x = torch.randn(64, 32, dtype=F64) * 2
    want = torch.empty_like(x)
    want[:, 0::2], want[:, 1::2] = -4 * x[:, 0::2] ** 3 + 12 * x[:, 0::2] + 0.5, -x[:, 1::2]
    torch.testing.assert_close(Target.grad_log_prob(get_target("manywell"), x), want, rtol=1e-12, atol=1e-12)
    g = get_target("gaussian", mu=0.3, std=2.0, dim=32, log_z=-4.0)
    torch.testing.assert_close(Target.grad_log_prob(g, x), -(x - 0.3) / 4.0, rtol=1e-12, atol=1e-12)


# ---- user targets and bad input -------------------------------------------------------------------------------

USER_MODULE = """
    import torch
    def good(x):
        return -0.5 * x.pow(2).sum(1)
    good.dim, good.log_z = 3, 1.5 * __import__("math").log(2 * __import__("math").pi)
    def nan(x):
        return torch.full((x.shape[0],), float("nan"))
    def nan_far(x):                      # NaN only where x0 > 10: passes the probe, fails later
        return torch.where(x[:, 0] > 10, float("nan"), -x.pow(2).sum(1))
    def pos_inf(x):
        return torch.full((x.shape[0],), float("inf"))
    def neg_inf_left(x):                 # zero density for x0 < 0: allowed
        return torch.where(x[:, 0] < 0, -float("inf"), -x.pow(2).sum(1))
    def column(x):
        return -x.pow(2).sum(1, keepdim=True)
    def raises(x):
        raise RuntimeError("boom")
    not_callable = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "fieldtrain_test_user_density"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_target_loads_and_behaves(user_module):
    t = load_user_target(f"{user_module}:good")
    assert t.name == f"{user_module}:good" and t.dim == 3 and t.log_z == pytest.approx(1.5 * math.log(2 * math.pi))
    x = torch.randn(8, 3, dtype=F64)
    torch.testing.assert_close(t.grad_log_prob(x), -x)
    assert get_target(f"{user_module}:good", dim=3, log_z=None).log_z is None   # params override the attributes
    with pytest.raises(ValueError, match=f"target '{user_module}:good' has no exact sampler"):
        t.sample(4)
    u = load_user_target(f"{user_module}:neg_inf_left", dim=2)
    assert torch.isneginf(checked_log_prob(u, torch.tensor([[-1.0, 0.0], [1.0, 0.0]])))[0]
    far = load_user_target(f"{user_module}:nan_far", dim=2)
    with pytest.raises(ValueError, match=f"target '{user_module}:nan_far': log_prob is nan at x = \\[20.0, 0.0\\]"):
        checked_log_prob(far, torch.tensor([[0.0, 0.0], [20.0, 0.0]]))


@pytest.mark.parametrize("attr, params, why", [
    ("nan", {"dim": 2}, "log_prob is nan"),
    ("pos_inf", {"dim": 2}, "log_prob is inf"),
    ("column", {"dim": 2}, r"gave shape \(4, 1\)"),
    ("raises", {"dim": 2}, "raised RuntimeError: boom"),
    ("not_callable", {}, "is a int, not callable"),
    ("nan", {}, "dimension unknown; give 'dim'"),
    ("good", {"dim": 0}, "'dim' = 0"),
    ("good", {"scale": 2}, r"unknown parameter\(s\) \['scale'\]"),
    ("missing", {}, "cannot load it"),
])
def test_bad_user_targets_name_the_path(user_module, attr, params, why):
    with pytest.raises(ValueError, match=f"target '{user_module}:{attr}': .*{why}"):
        load_user_target(f"{user_module}:{attr}", **params)


def test_bad_names_params_and_shapes():
    with pytest.raises(ValueError, match="'target.name' = 'gmm9'; allowed: 'gmm25', 'funnel', 'funnel_easy'"):
        get_target("gmm9")
    with pytest.raises(ValueError, match="target 'no_such_pkg.mod:fn': cannot load it .*ModuleNotFoundError"):
        load_user_target("no_such_pkg.mod:fn")
    with pytest.raises(ValueError, match="target 'nocolon': must be 'package.module:callable'"):
        load_user_target("nocolon")
    with pytest.raises(ValueError, match="target 'gmm25': unknown parameter\\(s\\) 'std'; allowed: none"):
        get_target("gmm25", std=1.0)
    with pytest.raises(ValueError, match="target 'gaussian': 'std' = -1.0; must be a number > 0"):
        get_target("gaussian", std=-1.0)
    with pytest.raises(ValueError, match="target 'gaussian': 'mu' = \\[1.0, 2.0\\]; must be a number or 3 numbers"):
        get_target("gaussian", mu=[1.0, 2.0], dim=3)
    with pytest.raises(ValueError, match="target 'manywell': 'dim' = 5; must be an even integer >= 2"):
        get_target("manywell", dim=5)
    assert get_target("funnel", dim=4).dim == 4
    for name, shape in [("gmm25", (4, 3)), ("funnel", (4, 2)), ("manywell", (32,))]:
        with pytest.raises(ValueError, match=f"target '{name}': x has shape"):
            checked_log_prob(get_target(name), torch.zeros(shape))

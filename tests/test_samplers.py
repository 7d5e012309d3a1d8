"""Schedules and samplers against analytic answers (EDM parameterisation, float64 throughout).

Convergence orders: the global error at the end of the schedule against the exact (Gaussian: closed form) or a
fine reference (mixture: RK4 in log sigma, 2000 steps, self-checked against 1000) probability-flow solution from the
same starting noise, fitted as the slope of log RMS error against log steps. The main test ends the schedule at
sigma_min > 0 (EDM's levels without the final 0): the error there is the ODE integration error, which is what an
order claims. Ending with EDM's fixed sigma_min -> 0 step would add a constant error (the first-order step into 0
has error O(sigma_min^2) whatever the step count), so the into-zero test uses a schedule that refines all the way,
s_i = s_max (1 - i/N)^rho ending exactly at 0 (EDM's formula with sigma_min = 0), and checks the order survives the
step into lambda = inf. Asymptotic range: by inspection the slopes between successive step counts settle from
N ~ 45 on for these problems, approaching the order from above (3M: 3.2 between 45 and 64, 3.05 between 181 and
256), so the fit uses N = 64..256, where the smallest error (~5e-6) is still far above the reference's (~3e-10).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.diffusion import analytic, samplers
from trainer.diffusion.samplers import SAMPLERS, STOCHASTIC, get_sampler, nfe
from trainer.diffusion.schedules import (AYS_TABLES, SCHEDULES, ays_gaussian_sigmas, ays_sigmas, check_sigmas,
                                         edm_sigmas, get_sigmas, logsnr_sigmas)

F64 = torch.float64
ORDERS = {"euler": 1, "heun": 2, "dpmpp_2m": 2, "dpmpp_3m": 3, "unipc": 3}
ORDER_STEPS = (64, 91, 128, 181, 256)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def fitted_order(steps, errors) -> float:
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def ramp_to_zero(n: int, rho: float = 7.0) -> torch.Tensor:
    return SIGMA_MAX * (1 - torch.arange(n + 1, dtype=F64) / n) ** rho


@pytest.fixture(scope="module")
def gaussian():
    """N(mu, S) in d = 3 with a non-diagonal S (eigenvalues ~0.22, 0.75, 3.6), 64 starting noises."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    cov = a @ a.T / 3 + 0.2 * torch.eye(3, dtype=F64)
    mu = torch.randn(3, generator=g, dtype=F64)
    x0 = SIGMA_MAX * torch.randn(64, 3, generator=g, dtype=F64)
    return {"mu": mu, "cov": cov, "den": analytic.gaussian_denoiser(mu, cov), "x0": x0}


MIX_W = [0.3, 0.7]
MIX_MUS = torch.tensor([[-1.0, 0.5, 0.2], [1.0, -0.5, 0.0]], dtype=F64)
MIX_COVS = torch.tensor([[[0.5, 0.2, 0.0], [0.2, 0.3, 0.1], [0.0, 0.1, 0.4]],
                         [[0.4, -0.1, 0.05], [-0.1, 0.6, 0.0], [0.05, 0.0, 0.3]]], dtype=F64)


@pytest.fixture(scope="module")
def mixture():
    """Two overlapping full-covariance components in d = 3; references at sigma_min and (via 1e-5) at 0."""
    den = analytic.mixture_denoiser(MIX_W, MIX_MUS, MIX_COVS)
    x0 = SIGMA_MAX * torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = analytic.reference_pf_ode(den, x0, SIGMA_MAX, SIGMA_MIN, steps=2000)
    coarse = analytic.reference_pf_ode(den, x0, SIGMA_MAX, SIGMA_MIN, steps=1000)
    tiny = 1e-5                                   # x(0) = D(x(tiny); tiny) + O(tiny^2 / var) ~ 1e-10
    ref0 = analytic.reference_pf_ode(den, x0, SIGMA_MAX, tiny, steps=2000)
    ref0 = den(ref0, torch.full((64,), tiny, dtype=F64))
    return {"den": den, "x0": x0, "ref": ref, "ref_error": rms(ref, coarse), "ref0": ref0}


# ---- schedules -------------------------------------------------------------------------------------------------
def test_edm_schedule_matches_published_values():
    published = [80, 42.4152, 21.1087, 9.7232, 4.0661, 1.5017, 0.4700, 0.1166, 0.0204, 0.002, 0]
    s = edm_sigmas(10)
    assert s.dtype == F64 and len(s) == 11
    assert torch.allclose(s, torch.tensor(published, dtype=F64), rtol=0, atol=5e-5)
    assert s[0] == 80 and s[-2] == pytest.approx(0.002, rel=1e-12) and s[-1] == 0
    assert edm_sigmas(1).tolist() == [80.0, 0.0]
    assert SCHEDULES["edm"] is edm_sigmas


@pytest.mark.parametrize("table", sorted(AYS_TABLES))
def test_ays_returns_the_table_and_interpolates_log_sigma(table):
    levels = torch.tensor(AYS_TABLES[table], dtype=F64)
    s10 = ays_sigmas(10, table)
    assert torch.equal(s10[:-1], levels[:-1]) and s10[-1] == 0          # sigma_min replaced by the final 0
    s20 = ays_sigmas(20, table)                                          # the table's points at even indices,
    assert len(s20) == 21 and (s20[1:] < s20[:-1]).all()               # geometric means in between
    assert torch.allclose(s20[0:-1:2], levels[:-1], rtol=1e-12)
    assert torch.allclose(s20[1:-1:2], (levels[:-1] * levels[1:]).sqrt(), rtol=1e-12)
    s5 = ays_sigmas(5, table)
    assert len(s5) == 6 and s5[0] == levels[0] and (s5[1:] < s5[:-1]).all()


def test_ays_gaussian_endpoints_spacing_and_monotonicity():
    for n, c in [(2, 1.0), (7, 0.5), (30, 2.0)]:
        s = ays_gaussian_sigmas(n, c, SIGMA_MIN, SIGMA_MAX)
        assert len(s) == n + 1 and s[0] == SIGMA_MAX and s[-2] == SIGMA_MIN and s[-1] == 0
        assert (s[1:] < s[:-1]).all()
        du = torch.diff(torch.atan(s[:-1] / c))
        assert torch.allclose(du, du.mean().expand_as(du), rtol=1e-9)   # even in atan(sigma / c)
    assert ays_gaussian_sigmas(1, 1.0).tolist() == [SIGMA_MAX, 0.0]


def test_logsnr_schedule_values_spacing_and_errors():
    """Uniform in log sigma from sigma_max to sigma_min, then 0; n steps as in edm_sigmas."""
    s = logsnr_sigmas(4, 0.01, 10.0)                                     # ratio 10 per step: 10, 1, 0.1, 0.01, 0
    assert s.dtype == F64 and torch.allclose(s, torch.tensor([10.0, 1.0, 0.1, 0.01, 0.0], dtype=F64), rtol=1e-13)
    for n, lo in [(2, SIGMA_MIN), (9, SIGMA_MIN), (40, 0.02)]:
        s = logsnr_sigmas(n, lo, SIGMA_MAX)
        assert len(s) == n + 1 and s[0] == SIGMA_MAX and s[-2] == lo and s[-1] == 0
        assert (s[1:] < s[:-1]).all()
        dlam = torch.diff(-torch.log(s[:-1]))                           # equal steps h in lambda = -log sigma
        assert torch.allclose(dlam, torch.full_like(dlam, math.log(SIGMA_MAX / lo) / (n - 1)), rtol=1e-9)
        assert torch.equal(get_sigmas("logsnr", n, sigma_min=lo, sigma_max=SIGMA_MAX), s)
    assert logsnr_sigmas(1).tolist() == [SIGMA_MAX, 0.0]
    assert SCHEDULES["logsnr"] is logsnr_sigmas
    for n in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="'steps'"):
            logsnr_sigmas(n)
    for lo, hi in [(0.0, 80.0), (-1.0, 80.0), (1.0, 1.0), (2.0, 1.0), (0.002, math.inf), (math.nan, 80.0)]:
        with pytest.raises(ValueError, match="'sigma_min'"):
            get_sigmas("logsnr", 10, sigma_min=lo, sigma_max=hi)


def euler_gain(sigmas: torch.Tensor, c: float) -> float:
    """Euler's total gain x_end / x_start on N(0, c^2) (it is linear there)."""
    den = analytic.gaussian_denoiser(torch.zeros(1, dtype=F64), torch.tensor([[c * c]], dtype=F64))
    return samplers.sample_euler(den, torch.ones(1, 1, dtype=F64), sigmas).item()


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_ays_gaussian_beats_edm_for_euler_on_gaussian_data(c):
    """AYS's optimum for N(0, c^2 I): Euler's gain is the exact gain times prod cos(du_i), u = atan(sigma / c)
    (checked here for any schedule), so equal du maximises it: the least shrinkage, i.e. both the smallest error
    of the sample map against the exact PF flow and the smallest W2 = |std_out - c| of the sampled Gaussian."""
    exact = c / math.hypot(c, SIGMA_MAX)
    for n in (3, 5, 10, 20, 50):
        edm, ays = edm_sigmas(n), ays_gaussian_sigmas(n, c)
        for s in (edm, ays):
            assert euler_gain(s, c) / exact == pytest.approx(torch.cos(torch.diff(torch.atan(s / c))).prod().item(),
                                                             rel=1e-12)
        g_edm, g_ays = euler_gain(edm, c), euler_gain(ays, c)
        assert abs(g_ays - exact) < abs(g_edm - exact)
        assert abs(SIGMA_MAX * g_ays - c) < abs(SIGMA_MAX * g_edm - c)
    # and it is a local optimum: moving any interior level (in u) makes Euler worse
    s = ays_gaussian_sigmas(10, c)
    u = torch.atan(s / c)
    for k in range(1, 9):
        for step in (-0.02, 0.02):
            v = u.clone()
            v[k] += step * (u[k - 1] - u[k])
            assert euler_gain(c * torch.tan(v), c) < euler_gain(s, c)


@pytest.mark.parametrize("bad, what", [
    ([1.0], "at least 2"), ([[1.0, 0.0]], "1-D"), ([1.0, 2.0, 0.0], "strictly decreasing"),
    ([1.0, 1.0, 0.0], "strictly decreasing"), ([1.0, -0.5], ">= 0"), ([math.nan, 0.0], "finite"),
    ([math.inf, 1.0, 0.0], "finite"), ("abc", "numbers")])
def test_check_sigmas_rejects(bad, what):
    with pytest.raises(ValueError, match="'sigmas'") as e:
        check_sigmas(bad)
    assert what in str(e.value)


def test_check_sigmas_and_get_sigmas():
    s = check_sigmas([3, 1, 0])
    assert s.dtype == F64 and s.tolist() == [3.0, 1.0, 0.0]
    kw = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX}
    assert torch.equal(get_sigmas("edm", 10, **kw), edm_sigmas(10))
    assert torch.equal(get_sigmas("ays", 10, **kw, table="sd15"), ays_sigmas(10, "sd15"))
    assert torch.equal(get_sigmas("ays_gaussian", 10, **kw, c=0.5), ays_gaussian_sigmas(10, 0.5))
    assert get_sigmas("list", 2, **kw, sigmas=[2.0, 1.0, 0.0]).tolist() == [2.0, 1.0, 0.0]
    with pytest.raises(ValueError) as e:
        get_sigmas("foo", 10, **kw)
    assert str(e.value) == "'schedule' = 'foo'; allowed: 'edm', 'ays', 'ays_gaussian', 'logsnr', 'list'"
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="'steps'"):
            get_sigmas("edm", steps, **kw)
    for n in (0, -1):
        for fn in (edm_sigmas, ays_sigmas, lambda n: ays_gaussian_sigmas(n, 1.0), logsnr_sigmas):
            with pytest.raises(ValueError, match="'steps'"):
                fn(n)
    with pytest.raises(ValueError, match="'c'"):
        get_sigmas("ays_gaussian", 10, **kw)
    with pytest.raises(ValueError, match="'sigmas'"):
        get_sigmas("list", 2, **kw)
    with pytest.raises(ValueError, match="'sigmas'"):
        get_sigmas("list", 2, **kw, sigmas=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="'steps'"):
        get_sigmas("list", 5, **kw, sigmas=[2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="'sigmas'"):
        get_sigmas("edm", 2, **kw, sigmas=[2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="'table'"):
        get_sigmas("ays", 10, **kw, table="sd3")
    with pytest.raises(ValueError, match="'sigma_min'"):
        get_sigmas("edm", 10, sigma_min=1.0, sigma_max=0.5)


def test_get_sampler_and_nfe_errors():
    assert get_sampler("unipc") is samplers.sample_unipc
    with pytest.raises(ValueError) as e:
        get_sampler("ddim")
    assert str(e.value).startswith("'sampler' = 'ddim'; allowed: 'euler', 'heun'")
    with pytest.raises(ValueError, match="'sampler'"):
        nfe("ddim", edm_sigmas(5))
    with pytest.raises(ValueError, match="'sigmas'"):
        samplers.sample_euler(lambda x, s: x, torch.zeros(1, 1), [0.0, 1.0])
    with pytest.raises(ValueError, match="'s_churn'"):
        samplers.sample_heun(lambda x, s: x, torch.zeros(1, 1), [1.0, 0.0], s_churn=-1.0)
    assert STOCHASTIC <= set(SAMPLERS)


# ---- denoiser calls, callbacks, dtypes -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_equals_counted_denoiser_calls(name, gaussian):
    calls = []

    def counting(x, sigma):
        assert sigma.shape == (len(x),) and sigma.dtype == x.dtype
        calls.append(sigma[0].item())
        return gaussian["den"](x, sigma)
    options = [{}] + ([{"s_churn": 10.0}] if name == "heun" else [])
    for sigmas in (edm_sigmas(1), edm_sigmas(2), edm_sigmas(7), edm_sigmas(7)[:-1], torch.tensor([3.0, 1.0])):
        for opts in options:
            calls.clear()
            SAMPLERS[name](counting, gaussian["x0"][:4] * sigmas[0] / SIGMA_MAX, sigmas,
                           generator=torch.Generator().manual_seed(0), **opts)
            assert len(calls) == nfe(name, sigmas), (sigmas, opts)
            assert min(calls) > 0                                  # never evaluated at sigma = 0


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_once_per_step_and_may_replace_x(name, gaussian):
    sigmas, seen = edm_sigmas(6), []

    def record(i, x, sigma, denoised):
        seen.append((i, sigma))
        assert x.shape == denoised.shape == (4, 3)
    g = torch.Generator().manual_seed(0)
    SAMPLERS[name](gaussian["den"], gaussian["x0"][:4], sigmas, generator=g, callback=record)
    assert seen == [(i, sigmas[i + 1].item()) for i in range(6)]
    out = SAMPLERS[name](gaussian["den"], gaussian["x0"][:4], sigmas, generator=g,
                         callback=lambda i, x, s, d: torch.full_like(x, 7.0) if i == 5 else None)
    assert (out == 7.0).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_float32_runs_and_agrees_with_float64(name, mixture):
    sigmas = edm_sigmas(12)
    x64 = SAMPLERS[name](mixture["den"], mixture["x0"], sigmas, generator=torch.Generator().manual_seed(3))
    x32 = SAMPLERS[name](mixture["den"], mixture["x0"].float(), sigmas, generator=torch.Generator().manual_seed(3))
    assert x32.dtype == torch.float32 and torch.isfinite(x32).all()
    if name not in STOCHASTIC:     # same maths in single precision (the noise streams differ between dtypes)
        assert rms(x32.double(), x64) < 1e-4


# ---- convergence orders ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ORDERS))
def test_order_on_gaussian_data(name, gaussian):
    """Non-isotropic Gaussian: the sampler is linear, the reference is the exact flow, no Monte-Carlo noise."""
    exact = analytic.pf_ode_gaussian(gaussian["x0"], SIGMA_MAX, SIGMA_MIN, gaussian["mu"], gaussian["cov"])
    errors = [rms(SAMPLERS[name](gaussian["den"], gaussian["x0"], edm_sigmas(n)[:-1]), exact)   # end at sigma_min
              for n in ORDER_STEPS]
    assert abs(fitted_order(ORDER_STEPS, errors) - ORDERS[name]) <= 0.2, errors


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_order_on_mixture_data(name, mixture):
    assert mixture["ref_error"] < 1e-7
    errors = [rms(SAMPLERS[name](mixture["den"], mixture["x0"], edm_sigmas(n)[:-1]), mixture["ref"])
              for n in ORDER_STEPS]
    assert min(errors) > 100 * mixture["ref_error"]
    assert abs(fitted_order(ORDER_STEPS, errors) - ORDERS[name]) <= 0.2, errors


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_order_survives_the_step_into_sigma_zero(name, gaussian, mixture):
    exact0 = analytic.pf_ode_gaussian(gaussian["x0"], SIGMA_MAX, 0.0, gaussian["mu"], gaussian["cov"])
    for den, x0, ref in ((gaussian["den"], gaussian["x0"], exact0), (mixture["den"], mixture["x0"], mixture["ref0"])):
        errors = [rms(SAMPLERS[name](den, x0, ramp_to_zero(n)), ref) for n in ORDER_STEPS]
        assert abs(fitted_order(ORDER_STEPS, errors) - ORDERS[name]) <= 0.2, errors


@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc"])
def test_third_order_when_the_first_step_matters(name, gaussian):
    """From sigma_max = 2 (not 80, where the data barely move the first step) a plain first-order start would
    cost the third-order methods an O(h^2) global error; 3M's revised first step and UniPC's corrector avoid it."""
    x0 = gaussian["x0"] * (2.0 / SIGMA_MAX)
    exact = analytic.pf_ode_gaussian(x0, 2.0, SIGMA_MIN, gaussian["mu"], gaussian["cov"])
    errors = [rms(SAMPLERS[name](gaussian["den"], x0, edm_sigmas(n, SIGMA_MIN, 2.0)[:-1]), exact)
              for n in ORDER_STEPS]
    assert abs(fitted_order(ORDER_STEPS, errors) - 3) <= 0.2, errors


def test_public_3m_weighting_is_only_second_order(gaussian):
    """Why the 2 on C_2 in sample_dpmpp_3m: the same multistep method with the public dpm-solver / k-diffusion
    weight on the second divided difference (C_2 instead of 2 C_2) is second order."""
    errors = []
    for n in ORDER_STEPS:
        s = edm_sigmas(n)[:-1].tolist()
        x, den, hist = gaussian["x0"], gaussian["den"], []
        for i in range(n - 1):
            d = den(x, torch.full((64,), s[i], dtype=F64))
            lam, h = -math.log(s[i]), math.log(s[i] / s[i + 1])
            c1 = h + math.expm1(-h)
            x_next = math.exp(-h) * x - math.expm1(-h) * d
            if len(hist) == 1:
                x_next = x_next + c1 * (d - hist[0][1]) / (lam - hist[0][0])
            elif len(hist) == 2:
                h1, h2 = lam - hist[0][0], hist[0][0] - hist[1][0]
                f1 = (d - hist[0][1]) / h1
                f2 = (f1 - (hist[0][1] - hist[1][1]) / h2) / (h1 + h2)
                x_next = x_next + c1 * (f1 + h1 * f2) + (h * h / 2 - c1) * f2     # public weight: C_2, not 2 C_2
            hist = [(lam, d)] + hist[:1]
            x = x_next
        exact = analytic.pf_ode_gaussian(gaussian["x0"], SIGMA_MAX, SIGMA_MIN, gaussian["mu"], gaussian["cov"])
        errors.append(rms(x, exact))
    assert abs(fitted_order(ORDER_STEPS, errors) - 2) <= 0.2, errors


# ---- lower_order_final -----------------------------------------------------------------------------------------
LOWERED = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "unipc")


def _fixed_noise(x, generator):
    return torch.full_like(x, 0.3)


@pytest.mark.parametrize("name", LOWERED)
def test_lower_order_final_takes_a_first_order_last_step_below_15_steps(name, gaussian, monkeypatch):
    """Below 15 steps the last step into sigma > 0 (j) is the first-order step from the x and D it starts from,
    x_{j+1} = e^{-h} x_j + (1 - e^{-h}) D_j (2M SDE, eta = 1: e^{-2h} ... + s_{j+1} sqrt(1 - e^{-2h}) eps, eps
    fixed here); the output is that or, on a schedule ending in 0, D(x_{j+1}; s_{j+1}). x_j and D_j come from the
    callback (after step j - 1; at step j); 3M's x_1 also carries step 0's revision, UniPC's D_j is D at the
    predicted point. On 3M the step before is its second-order step. Gaussian data: linear, so exact to rounding;
    without lower_order_final the same checks fail (the test can see the difference)."""
    monkeypatch.setattr(samplers, "_randn", _fixed_noise)
    den, x0 = gaussian["den"], gaussian["x0"][:8]
    for sigmas in (edm_sigmas(3), edm_sigmas(4), edm_sigmas(6), edm_sigmas(14), edm_sigmas(11)[:-1],
                   logsnr_sigmas(9, 0.02, SIGMA_MAX)):
        s = sigmas.tolist()
        j = len(s) - 2 - (s[-1] == 0)
        outs = {}
        for lof in (True, False):
            xs, ds = [], []

            def record(i, x, sigma, denoised):
                xs.append(x)
                ds.append(denoised)
            out = SAMPLERS[name](den, x0 * s[0] / SIGMA_MAX, sigmas, callback=record, lower_order_final=lof)
            x_j, d_j, h = xs[j - 1], ds[j], math.log(s[j] / s[j + 1])
            if name == "dpmpp_3m" and j == 1:
                h0 = math.log(s[0] / s[1])
                x_j = x_j + (h0 + math.expm1(-h0)) * (ds[1] - ds[0]) / h0
            if name == "dpmpp_2m_sde":
                step = (s[j + 1] / s[j]) * math.exp(-h) * x_j - math.expm1(-2 * h) * d_j \
                    + s[j + 1] * math.sqrt(-math.expm1(-2 * h)) * 0.3
            else:
                step = math.exp(-h) * x_j - math.expm1(-h) * d_j
            end = step if s[-1] > 0 else den(step, torch.full((len(x0),), s[j + 1], dtype=F64))
            outs[lof] = rms(out, end) / rms(end, torch.zeros_like(end))
            if name == "dpmpp_3m" and lof and j >= 3:         # step j - 1: order 2 (order 3 without the option)
                x_p, d_p, h = xs[j - 2], ds[j - 1], math.log(s[j - 1] / s[j])
                f1 = (d_p - ds[j - 2]) / math.log(s[j - 2] / s[j - 1])
                second = math.exp(-h) * x_p - math.expm1(-h) * d_p + (h + math.expm1(-h)) * f1
                assert torch.allclose(xs[j - 1], second, rtol=1e-12, atol=1e-12), s
        assert outs[True] < 1e-13 and outs[False] > 1e-6, (s, outs)


@pytest.mark.parametrize("name", LOWERED)
def test_lower_order_final_changes_nothing_from_15_steps(name, mixture):
    """From 15 steps (= NFE, the step into 0 included) the option is inactive: bit-identical results (the same
    noise, for the SDE). At 14 it acts, and it is on by default."""
    den, x0 = mixture["den"], mixture["x0"][:16]

    def run(sigmas, **opts):
        return SAMPLERS[name](den, x0 * sigmas[0].item() / SIGMA_MAX, sigmas,
                              generator=torch.Generator().manual_seed(4), **opts)
    for sigmas in (edm_sigmas(15), edm_sigmas(16)[:-1], logsnr_sigmas(15, 0.02, SIGMA_MAX), edm_sigmas(40)):
        assert torch.equal(run(sigmas, lower_order_final=True), run(sigmas, lower_order_final=False))
    for sigmas in (edm_sigmas(14), edm_sigmas(15)[:-1]):
        lowered = run(sigmas, lower_order_final=True)
        assert torch.equal(run(sigmas), run(sigmas, lower_order_final=False))   # off by default
        assert not torch.equal(lowered, run(sigmas, lower_order_final=False))


# ---- Heun's churn ----------------------------------------------------------------------------------------------
def test_heun_without_churn_is_edm_algorithm_1_bit_for_bit(mixture):
    """'Bit for bit' here: S_churn = 0, and churn switched on but with gamma_i = 0 at every level (S_tmin above
    sigma_max), run the same floating-point operations as a plain transcription of EDM Algorithm 1, draw no noise
    and leave the generator untouched. Churn that is active changes the result and consumes the generator."""
    den, x0, sigmas = mixture["den"], mixture["x0"], edm_sigmas(9)
    s = sigmas.tolist()
    x = x0
    for i in range(9):                          # EDM Algorithm 1, transcribed
        d = (x - den(x, torch.full((64,), s[i], dtype=F64))) / s[i]
        x_next = x + (s[i + 1] - s[i]) * d
        if s[i + 1] != 0:
            d_next = (x_next - den(x_next, torch.full((64,), s[i + 1], dtype=F64))) / s[i + 1]
            x_next = x + (s[i + 1] - s[i]) * (0.5 * d + 0.5 * d_next)
        x = x_next
    plain = samplers.sample_heun(den, x0, sigmas)
    assert torch.equal(plain, x)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert torch.equal(samplers.sample_heun(den, x0, sigmas, s_churn=0.0, generator=g), plain)
    assert torch.equal(samplers.sample_heun(den, x0, sigmas, s_churn=40.0, s_tmin=100.0, generator=g), plain)
    assert torch.equal(g.get_state(), state)
    churned = samplers.sample_heun(den, x0, sigmas, s_churn=40.0, generator=g)
    assert not torch.equal(churned, plain) and not torch.equal(g.get_state(), state)


# ---- stochastic samplers ---------------------------------------------------------------------------------------
def test_eta_zero_gives_the_ode_samplers(mixture):
    den, x0, sigmas = mixture["den"], mixture["x0"], edm_sigmas(15)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.allclose(samplers.sample_euler_ancestral(den, x0, sigmas, eta=0.0, generator=g),
                          samplers.sample_euler(den, x0, sigmas), rtol=0, atol=1e-12)
    assert torch.allclose(samplers.sample_dpmpp_2m_sde(den, x0, sigmas, eta=0.0, generator=g),
                          samplers.sample_dpmpp_2m(den, x0, sigmas), rtol=0, atol=1e-12)
    assert torch.equal(g.get_state(), state)


STOCHASTIC_RUNS = {"euler_ancestral": ("euler_ancestral", {}), "dpmpp_2m_sde": ("dpmpp_2m_sde", {}),
                   "heun_churn": ("heun", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0})}
VAR_C = 1.5


def exact_output_variance(name: str, sigmas: torch.Tensor, options: dict, monkeypatch) -> float:
    """The discrete sampler's exact output variance on N(0, c^2): there it is linear in the start x0 ~
    N(0, sigma_0^2) and its noise draws eps_j, x_out = a x0 + sum_j b_j eps_j, so Var = (a sigma_0)^2 + sum b_j^2.
    Row 0 carries x0 = sigma_0 and no noise; row j carries x0 = 0 and a unit impulse as its j-th draw (the sampler's
    own noise helper is replaced for this), so the sampler's own code computes every coefficient."""
    den = analytic.gaussian_denoiser(torch.zeros(1, dtype=F64), torch.tensor([[VAR_C ** 2]], dtype=F64))
    rows = len(sigmas) + 1
    draw = iter(range(1, rows))

    def impulse(x, generator):
        e = torch.zeros_like(x)
        e[next(draw)] = 1.0
        return e
    with monkeypatch.context() as m:
        m.setattr(samplers, "_randn", impulse)
        x0 = torch.zeros(rows, 1, dtype=F64)
        x0[0] = sigmas[0]
        out = SAMPLERS[name](den, x0, sigmas, **options)
    return out.pow(2).sum().item()


@pytest.mark.parametrize("run", sorted(STOCHASTIC_RUNS))
def test_stochastic_variance_on_gaussian(run, monkeypatch):
    """Var of the output on N(0, c^2), c = 1.5, 100 EDM steps. K = 20000 x 10 independent coordinates, mean known
    (0), so the estimate mean(x^2) has std v sqrt(2 / K'), K' = 200000. Bounds: 5 std against the exact discrete
    variance (above), and 5 std plus that exact discretisation bias against c^2; the bias itself shrinks with the
    steps (checked at 50, 100, 200, 400: each doubling at least 1.6x smaller)."""
    name, options = STOCHASTIC_RUNS[run]
    sigmas = edm_sigmas(100)
    v_exact = exact_output_variance(name, sigmas, options, monkeypatch)
    den = analytic.gaussian_denoiser(torch.zeros(10, dtype=F64), VAR_C ** 2 * torch.eye(10, dtype=F64))
    g = torch.Generator().manual_seed(11)
    out = SAMPLERS[name](den, SIGMA_MAX * torch.randn(20000, 10, generator=g, dtype=F64), sigmas, generator=g,
                         **options)
    v_hat, k = out.pow(2).mean().item(), out.numel()
    mc = math.sqrt(2 / (k - 1))
    assert abs(v_hat - v_exact) <= 5 * v_exact * mc
    c2 = VAR_C ** 2
    assert abs(v_hat - c2) <= 5 * c2 * mc + abs(v_exact - c2)
    biases = [abs(exact_output_variance(name, edm_sigmas(n), options, monkeypatch) / c2 - 1)
              for n in (50, 100, 200, 400)]
    assert all(b2 < b1 / 1.6 for b1, b2 in zip(biases, biases[1:])), biases
    assert biases[-1] < 0.03


@pytest.mark.parametrize("run", sorted(STOCHASTIC_RUNS))
def test_stochastic_mixture_weights(run):
    """Two components 5 apart (about 10 standard deviations), weights 0.3 / 0.7; K = 4000 samples, 100 EDM steps,
    assigned by the sign of the first coordinate (misassignment probability < 1e-6). The fraction in component 0 has
    binomial std sqrt(p (1 - p) / K) = 0.0072; bound: 5 std plus 0.01 for the discretisation bias (measured
    offline with 1e5 samples: at most 0.007, Euler ancestral, decreasing as 1/N)."""
    name, options = STOCHASTIC_RUNS[run]
    w = [0.3, 0.7]
    mus = torch.tensor([[-2.5, 0.0], [2.5, 0.5]], dtype=F64)
    covs = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.25, -0.05], [-0.05, 0.4]]], dtype=F64)
    den = analytic.mixture_denoiser(w, mus, covs)
    g = torch.Generator().manual_seed(21)
    k = 4000
    out = SAMPLERS[name](den, SIGMA_MAX * torch.randn(k, 2, generator=g, dtype=F64), edm_sigmas(100), generator=g,
                         **options)
    frac = (out[:, 0] < 0).double().mean().item()
    assert abs(frac - w[0]) <= 5 * math.sqrt(w[0] * w[1] / k) + 0.01
    exact, _ = analytic.sample_mixture(w, mus, covs, k, generator=g)      # the same check passes on exact samples
    assert abs((exact[:, 0] < 0).double().mean().item() - w[0]) <= 5 * math.sqrt(w[0] * w[1] / k)

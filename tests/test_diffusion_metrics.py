"""Ensemble metrics against closed forms and brute force; figures are written as valid PNGs."""

import math

import pytest
import torch

from trainer.diffusion.figures import plot_error_vs_nfe, plot_samples, plot_spectra
from trainer.diffusion.inverse import PointObservation
from trainer.diffusion.metrics import (crps_ensemble, ensemble_mean_rel_l2, energy_spectrum, spectrum_error,
                                       spread_skill_ratio)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def crps_brute_force(ens, truth, fair):
    """E|X - y| - 1/2 E|X - X'| over all M^2 pairs (the i = j terms are zero)."""
    m = ens.shape[0]
    pairs = (ens[:, None] - ens[None, :]).abs().sum((0, 1)) / (m * (m - 1) if fair else m * m)
    return ((ens - truth).abs().mean(0) - pairs / 2).flatten(1).mean(1)


def crps_gaussian(mu, s, y):
    """CRPS(N(mu, s^2), y) = s [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)], z = (y - mu)/s (Gneiting 2005)."""
    z = (y - mu) / s
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi)
    return s * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def test_ensemble_mean_rel_l2():
    truth = torch.randn(3, 2, 8, 8, dtype=F64, generator=gen(0))
    e = torch.randn(3, 2, 8, 8, dtype=F64, generator=gen(1))
    assert torch.allclose(ensemble_mean_rel_l2(torch.stack([truth + e, truth - e]), truth), torch.zeros(3, dtype=F64))
    assert torch.allclose(ensemble_mean_rel_l2(torch.stack([2 * truth, 2 * truth]), truth), torch.ones(3, dtype=F64))


@pytest.mark.parametrize("fair", [False, True])
def test_crps_sorted_equals_brute_force(fair):
    ens = torch.randn(7, 2, 3, 5, 4, dtype=F64, generator=gen(2))
    truth = torch.randn(2, 3, 5, 4, dtype=F64, generator=gen(3))
    assert torch.allclose(crps_ensemble(ens, truth, fair=fair), crps_brute_force(ens, truth, fair), atol=1e-13)


def test_crps_single_member_is_absolute_error():
    ens, truth = torch.randn(1, 2, 1, 6, dtype=F64, generator=gen(4)), torch.zeros(2, 1, 6, dtype=F64)
    assert torch.allclose(crps_ensemble(ens, truth), ens[0].abs().flatten(1).mean(1))
    with pytest.raises(ValueError, match="fair"):
        crps_ensemble(ens, truth, fair=True)


def test_crps_matches_gaussian_closed_form():
    """M = 4000 members of N(mu, s^2) at 256 points with mu, s, y varying; averaged CRPS vs closed form.

    The fair estimator is unbiased; its per-point std is at most ~1.3 s / sqrt(M) (the |X - y| term, for
    y far in a tail), so the average over 256 independent points has std < 1.3 * 1.5 / sqrt(4000 * 256)
    = 1.9e-3 (measured over 20 seeds: 1.1e-3); tolerance 6e-3. The plain estimator exceeds the fair one
    by E|X - X'| / (2M) = s / (sqrt(pi) M) in expectation, too small for the closed-form check to see, so
    it is checked directly.
    """
    m, shape = 4000, (2, 1, 128)
    mu = torch.linspace(-1, 1, 256, dtype=F64).reshape(shape)
    s = torch.linspace(0.5, 1.5, 256, dtype=F64).flip(0).reshape(shape)
    y = torch.linspace(-2.5, 2.5, 256, dtype=F64).reshape(shape)
    ens = mu + s * torch.randn(m, *shape, dtype=F64, generator=gen(5))
    expected = crps_gaussian(mu, s, y).flatten(1).mean(1)
    fair = crps_ensemble(ens, y, fair=True)
    assert torch.allclose(fair, expected, atol=6e-3)
    bias = (s / (math.sqrt(math.pi) * m)).flatten(1).mean(1)
    assert torch.allclose(crps_ensemble(ens, y) - fair, bias, rtol=0.05)


def test_spread_skill_ratio():
    """Members and truth i.i.d. N(mu, s^2) per point (s in [0.5, 2]), M = 5, 20000 points.

    ratio^2 = spread / skill, two independent means over the points with relative std
    sqrt(2 / ((M - 1) n)) and sqrt(2 / n) (x ~1.3 for the varying s): the ratio's std is ~0.007 (measured over 20
    seeds: 0.0073), tolerance 0.04. Without the (M+1)/M correction the ratio would be sqrt(5/6) = 0.913.
    An under-dispersed ensemble (members' std s/2) gives sqrt(0.25 (M+1)/M / (1 + 0.25/M)).
    """
    m, shape = 5, (4, 1, 50, 100)
    mu = torch.randn(shape, dtype=F64, generator=gen(6))
    s = 0.5 + 1.5 * torch.rand(shape, dtype=F64, generator=gen(7))
    truth = mu + s * torch.randn(shape, dtype=F64, generator=gen(8))
    noise = torch.randn(m, *shape, dtype=F64, generator=gen(9))
    assert abs(float(spread_skill_ratio(mu + s * noise, truth)) - 1) < 0.04
    expected = math.sqrt(0.25 * (m + 1) / m / (1 + 0.25 / m))
    assert abs(float(spread_skill_ratio(mu + 0.5 * s * noise, truth)) - expected) < 0.04


def test_metric_user_errors():
    with pytest.raises(ValueError, match="ens"):
        crps_ensemble(torch.zeros(3, 2, 1, 8), torch.zeros(2, 1, 9))
    with pytest.raises(ValueError, match="members"):
        spread_skill_ratio(torch.zeros(1, 2, 1, 8), torch.zeros(2, 1, 8))
    with pytest.raises(ValueError, match="field"):
        energy_spectrum(torch.zeros(2, 1, 4, 4, 4))


def test_energy_spectrum_single_mode():
    """cos(2 pi (3x + 4y)) puts all its energy, mean square 1/2, in shell |k| = 5; 1-D likewise."""
    n = 32
    grid = torch.arange(n, dtype=F64) / n
    field = torch.cos(2 * math.pi * (3 * grid[:, None] + 4 * grid[None, :]))[None, None]
    k, e = energy_spectrum(field)
    assert torch.equal(k, torch.arange(k.numel())) and k.numel() == round(math.hypot(16, 16)) + 1
    assert torch.allclose(e[0, 0], 0.5 * (k == 5).to(F64), atol=1e-14)
    k1, e1 = energy_spectrum(torch.sin(2 * math.pi * 7 * grid)[None, None])
    assert k1.numel() == 17 and torch.allclose(e1[0, 0], 0.5 * (k1 == 7).to(F64), atol=1e-14)


@pytest.mark.parametrize("shape", [(3, 2, 24, 16), (3, 2, 40)])
def test_energy_spectrum_parseval(shape):
    field = torch.randn(shape, dtype=F64, generator=gen(10)) + 0.3
    _, e = energy_spectrum(field)
    assert torch.allclose(e.sum(-1), field.pow(2).flatten(2).mean(-1), rtol=1e-12)


def test_spectrum_error():
    truth = torch.randn(4, 1, 16, 16, dtype=F64, generator=gen(11))
    assert float(spectrum_error(truth, truth)) < 1e-12
    assert abs(float(spectrum_error(torch.stack([2 * truth, 2 * truth]), truth)) - math.log(4)) < 1e-12
    with pytest.raises(ValueError, match="pred"):
        spectrum_error(torch.zeros(4, 1, 8, 8), truth)


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 0 < path.stat().st_size < 400_000


def test_figures(tmp_path):
    truth = torch.randn(1, 16, 16, generator=gen(12))
    samples = truth + 0.3 * torch.randn(5, 1, 16, 16, generator=gen(13))
    obs = PointObservation(torch.tensor([3, 40, 100, 200]), (1, 16, 16))
    cond = obs.scatter(obs.observe(truth[None]), fill=math.nan)[0]
    assert _is_png(plot_samples(tmp_path / "samples.png", cond, truth, samples, title="2-D"))
    truth_1d = torch.sin(torch.linspace(0, 6, 48))
    assert _is_png(plot_samples(tmp_path / "s1d.png", None, truth_1d, truth_1d + 0.1 * torch.randn(4, 48)))
    k, e = energy_spectrum(samples)
    spectra = {"truth": energy_spectrum(truth[None])[1][0, 0], "samples": e.mean((0, 1))}
    assert _is_png(plot_spectra(tmp_path / "spectra.png", k, spectra))
    rows = [{"method": m, "nfe": n, "error": 1 / n**p} for m, p in (("euler", 1), ("heun", 2)) for n in (8, 16, 32)]
    assert _is_png(plot_error_vs_nfe(tmp_path / "sub" / "nfe.png", rows))
    with pytest.raises(ValueError, match="error"):
        plot_error_vs_nfe(tmp_path / "bad.png", [{"method": "euler", "nfe": 8}])

"""bench/diffusion.py's error-vs-NFE sweep on a tiny randomly initialised EDM-FNO (no training, no Ray): one row per
sampler x schedule x steps with the sampler's NFE, every sampler started from the same noise, and the rule for
"NFE to within 5% of the reference"."""

import math

import pytest
import torch

from bench import diffusion as bench
from data.loader import ChannelNormalizer
from trainer.diffusion.samplers import SAMPLERS, STOCHASTIC, nfe
from trainer.diffusion.sampling import sigmas_for

GRID = (8, 8)


@pytest.fixture(scope="module")
def tiny():
    from trainer.config import config_from_dict
    from trainer.registry import DataSpec, get_model_spec
    cfg = config_from_dict({"model": {"name": "edm", "edm": {"emb_dim": 8},
                                      "fno": {"width": 8, "modes": [3, 3], "n_layers": 1, "padding": 0,
                                              "projection_channels": 8}}})
    tnorm = ChannelNormalizer([0.5], [2.0])
    torch.manual_seed(0)
    model = get_model_spec("edm").build(cfg.model.params, DataSpec((1, *GRID), (1, *GRID), tnorm)).eval()
    g = torch.Generator().manual_seed(1)
    cond, truth = torch.randn(2, 1, *GRID, generator=g), 0.5 + 2.0 * torch.randn(2, 1, *GRID, generator=g)
    return model, tnorm, cond, truth


@pytest.fixture(scope="module")
def swept(tiny):
    model, tnorm, cond, truth = tiny
    return bench.error_vs_nfe(model, cond, truth, tnorm, members=2, seeds=[11, 12], steps_list=(1, 2, 3),
                              reference=("heun", "edm", 4))


def test_one_row_per_sampler_schedule_and_steps_with_the_samplers_nfe(tiny, swept):
    rows, ref = swept
    assert [(r["sampler"], r["schedule"], r["steps"]) for r in rows] == [
        (s, sc, n) for s in SAMPLERS for sc in bench.SCHEDULES for n in (1, 2, 3)]
    for r in rows:
        assert r["nfe"] == nfe(r["sampler"], sigmas_for(tiny[0], r["schedule"], r["steps"]))
        assert r["stochastic"] == (r["sampler"] in STOCHASTIC)
        for key in ("crps", "ens_mean_rel_l2", "spectrum_error", "spread_skill", "ref_dev", "crps_vs_ref"):
            assert math.isfinite(r[key]), (r, key)
        assert r["crps_vs_ref"] == pytest.approx(r["crps"] / ref["crps"] - 1)
    assert ref["nfe"] == 7 and ref["ref_dev"] == 0.0
    assert bench.sweep_nfe(SAMPLERS, bench.SCHEDULES, (1, 2, 3), ("heun", "edm", 4)) == ref["nfe"] + sum(
        r["nfe"] for r in rows)


def test_every_sampler_starts_from_the_same_noise(swept):
    """One step into sigma = 0 is x = D(x; sigma_max) for every sampler (the ancestral step adds no noise there), so
    with the same seeds every row of a schedule at 1 step is one ensemble (up to rounding: Heun writes it as
    x - (x - D)); at 2 steps Euler, DPM-Solver++(2M) and (3M) agree (their first step is Euler's, the last is D)."""
    rows, _ = swept
    by = {(r["sampler"], r["schedule"], r["steps"]): r for r in rows}
    for sc in bench.SCHEDULES:
        for steps, samplers in ((1, SAMPLERS), (2, ("dpmpp_2m", "dpmpp_3m"))):
            want = by[("euler", sc, steps)]
            for s in samplers:
                got = by[(s, sc, steps)]
                assert got["crps"] == pytest.approx(want["crps"], rel=1e-4), (s, sc, steps)
                assert got["ens_mean_rel_l2"] == pytest.approx(want["ens_mean_rel_l2"], rel=1e-4), (s, sc, steps)
        assert by[("euler", sc, 2)]["crps"] != by[("heun", sc, 2)]["crps"]


def test_nfe_to_within_takes_the_nfe_from_which_every_larger_one_stays_within():
    rows = [{"sampler": "a", "schedule": "edm", "nfe": n, "crps": c} for n, c in
            [(2, 1.5), (3, 1.03), (5, 1.2), (10, 1.04), (20, 0.97)]]
    rows += [{"sampler": "b", "schedule": "edm", "nfe": n, "crps": c} for n, c in [(2, 1.01), (4, 1.5)]]
    rows += [{"sampler": "c", "schedule": "ays", "nfe": n, "crps": c} for n, c in [(2, 1.0), (4, 0.99)]]
    assert bench.nfe_to_within(rows, 1.0) == {"a/edm": 10, "b/edm": None, "c/ays": 2}
    assert bench.nfe_to_within(rows, 1.0, one_sided=True) == {"a/edm": 10, "b/edm": None, "c/ays": 2}
    rows[2]["crps"] = 0.5   # a at 5 NFE far below the reference: outside |d| <= 5%, inside "at most 5% above"
    assert bench.nfe_to_within(rows, 1.0)["a/edm"] == 10
    assert bench.nfe_to_within(rows, 1.0, one_sided=True)["a/edm"] == 3

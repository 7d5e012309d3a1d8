"""bench/lowrank.py: the truncated-SVD errors it reports for PowerSGD's matrix views."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.lowrank import measure, summarise, view_errors  # noqa: E402


def test_view_errors_are_the_truncated_svd_of_each_view():
    """A complex (8, 8, 6, 4) tensor that is rank 1 as (in kx, out ky) = (48, 32), the balanced view, and rank 8
    (full) as (in, out kx ky): balanced is exact at rank 1, first needs rank 8; errors never rise with the rank."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(48, 1, dtype=torch.complex64, generator=g), torch.randn(1, 32, dtype=torch.complex64, generator=g)
    w = (u @ v).view(8, 6, 8, 4).permute(0, 2, 1, 3)
    rows = view_errors(w, [1, 2, 4, 8])
    err = {(r["view"], r["rank"]): r["rel_error"] for r in rows}
    assert err["balanced", 1] < 1e-6 and err["first", 1] > 0.1 and err["first", 8] < 1e-6
    for view in ("first", "balanced"):
        es = [err[view, r] for r in (1, 2, 4, 8)]
        assert all(a >= b - 1e-12 for a, b in zip(es, es[1:]))
    floats = {(r["view"], r["rank"]): r["floats"] for r in rows}
    assert floats["balanced", 2] == 2 * (48 + 32) * 2 and floats["first", 2] == 2 * (8 + 192) * 2


def test_measure_reports_every_spectral_weight_at_the_chosen_steps():
    x, y = torch.randn(20, 1, 24, 24), torch.randn(20, 1, 24, 24)
    rows = measure(x, y, steps=2, at=[0, 2], ranks=[1, 4])
    assert {r["step"] for r in rows} == {0, 2} and len({r["param"] for r in rows}) == 4
    summary = summarise(rows)
    assert len(summary) == 2 * 2 * 2 and all(s["params"] == 4 and 0 <= s["rel_error"] <= 1 for s in summary)

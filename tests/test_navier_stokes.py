"""Navier-Stokes generator against exact solutions (Taylor-Green decay, forced shear, the advection term),
CNAB2's order, and the per-chunk interface shared by the darcy, burgers and navier_stokes generators."""

import json

import numpy as np
import pytest

from data import burgers, darcy, navier_stokes
from data.burgers import gaussian_random_field_periodic
from data.navier_stokes import describe, fno_forcing, generate_navier_stokes, solve_navier_stokes
from data.store import FieldDataset, FieldDatasetWriter

S = 32
X, Y = np.meshgrid(np.arange(S) / S, np.arange(S) / S, indexing="ij")


def test_taylor_green_decays_exactly():
    # psi = cos(kx) cos(ky) / k, w = -Lap psi = 2k cos(kx) cos(ky): w is parallel to psi, so u . grad w = 0
    # and w(t) = w0 exp(-2 k^2 nu t).
    k, nu = 2 * np.pi, 1e-2
    w0 = 2 * k * np.cos(k * X) * np.cos(k * Y)
    errors = []
    for dt in (2e-3, 1e-3):
        w, t = solve_navier_stokes(w0[None], nu, 0.5, dt, record_steps=5)
        np.testing.assert_allclose(t, [0.1, 0.2, 0.3, 0.4, 0.5])
        exact = w0 * np.exp(-2 * k**2 * nu * t)[:, None, None]  # (5, S, S)
        errors.append(np.abs(w[0] - exact).max() / np.abs(w0).max())
    assert errors[1] < 1e-7  # measured 1.5e-8: Crank-Nicolson's error in exp(-2 k^2 nu dt)
    assert 3.8 < errors[0] / errors[1] < 4.2  # second order


def test_forced_shear_approaches_steady_state_exactly():
    # f depends on x + y only, so does w: u is along (1, -1), grad w along (1, 1), u . grad w = 0.
    # From w0 = 0: w(t) = f / (nu lam) (1 - exp(-nu lam t)), lam = 8 pi^2.
    nu, lam, f = 1e-2, 8 * np.pi**2, fno_forcing(S)
    w, t = solve_navier_stokes(np.zeros((1, S, S)), nu, 0.5, 1e-3, record_steps=5, forcing=f)
    exact = f / (nu * lam) * (1 - np.exp(-nu * lam * t))[:, None, None]
    assert np.abs(w[0] - exact).max() / np.abs(exact).max() < 1e-7  # measured 4.2e-8


def test_advection_term_matches_analytic():
    # w0 = sin(2 pi x) + cos(4 pi y), nu = f = 0: psi = sin(2 pi x) / (4 pi^2) + cos(4 pi y) / (16 pi^2),
    # u = psi_y, v = -psi_x, so w_t(0) = -(u w_x + v w_y) = -1.5 cos(2 pi x) sin(4 pi y).
    # Richardson on the difference quotient: 2 D(T/2) - D(T) = w_t(0) + O(T^2), D(t) = (w(t) - w0) / t.
    w0 = np.sin(2 * np.pi * X) + np.cos(4 * np.pi * Y)
    T = 2e-3
    w, _ = solve_navier_stokes(w0[None], 0.0, T, 1e-5, record_steps=2)
    w_t = 2 * (w[0, 0] - w0) / (T / 2) - (w[0, 1] - w0) / T
    exact = -1.5 * np.cos(2 * np.pi * X) * np.sin(4 * np.pi * Y)
    # measured 1.3e-6 (2.4e-3 without Richardson); a sign or axis mix-up in u . grad w gives O(1)
    assert np.abs(w_t - exact).max() < 1e-4


def test_cnab2_is_second_order_with_advection():
    # A strong random vortex field, forced: successive differences at dt, dt/2, dt/4 shrink by 4.
    w0 = 10 * gaussian_random_field_periodic(2, S, 2, 2.5, 7.0, rng=np.random.default_rng(0))
    runs = [solve_navier_stokes(w0, 1e-2, 0.4, dt, forcing=fno_forcing(S))[0] for dt in (4e-3, 2e-3, 1e-3)]
    ratio = np.abs(runs[0] - runs[1]).max() / np.abs(runs[1] - runs[2]).max()
    assert 3.8 < ratio < 4.2, ratio
    np.testing.assert_allclose(runs[2].mean(axis=(-2, -1)), 0.0, atol=1e-12)  # mean vorticity stays 0


def test_solver_validates():
    with pytest.raises(ValueError, match=r"\(n, s, s\) with s >= 4, got shape \(4, 4\)"):
        solve_navier_stokes(np.zeros((4, 4)), 1e-3, 1.0, 0.1)
    with pytest.raises(ValueError, match="record_steps=3 must divide the 10 time steps"):
        solve_navier_stokes(np.zeros((1, 8, 8)), 1e-3, 1.0, 0.1, record_steps=3)
    with pytest.raises(ValueError, match=r"forcing must be shape \(8, 8\)"):
        solve_navier_stokes(np.zeros((1, 8, 8)), 1e-3, 1.0, 0.1, forcing=np.zeros((4, 4)))


def test_describe_defaults_are_fno_nu_1e3_set():
    d = describe(64)
    p = d["params"]
    assert d["input_shape"] == (1, 64, 64) and d["target_shape"] == (50, 64, 64)
    assert d["grid_bounds"] == [[0.0, 1.0], [0.0, 1.0]]
    assert {k: p[k] for k in ("fine_factor", "fine_resolution", "nu", "T", "dt", "record_steps", "alpha", "tau",
                              "forcing")} == {"fine_factor": 4, "fine_resolution": 256, "nu": 1e-3, "T": 50.0,
                                              "dt": 1e-3, "record_steps": 50, "alpha": 2.5, "tau": 7.0,
                                              "forcing": True}
    assert p["sigma"] == pytest.approx(7**1.5) and p["times"] == [float(t) for t in range(1, 51)]
    assert describe(8, T=1.0, record_steps=4, forcing=False)["params"]["times"] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="record_steps=3 must divide the 1000 time steps"):
        describe(8, T=1.0, record_steps=3)
    with pytest.raises(ValueError, match="forcing must be True or False, got 'yes'"):
        describe(8, forcing="yes")
    with pytest.raises(ValueError, match=r"\['times'\] disagree"):
        describe(8, T=1.0, record_steps=2, times=[0.5, 0.75])


def test_generate_subsamples_the_fine_solve():
    kw = dict(fine_factor=2, nu=1e-2, T=0.2, dt=1e-2, record_steps=2)
    w0, w = generate_navier_stokes(2, 8, seed=[1, 3], **kw)
    assert w0.shape == (2, 1, 8, 8) and w.shape == (2, 2, 8, 8) and w0.dtype == w.dtype == np.float32
    fine = gaussian_random_field_periodic(2, 16, 2, 2.5, 7.0, rng=np.random.default_rng([1, 3]))
    np.testing.assert_array_equal(w0[:, 0], fine[:, ::2, ::2].astype(np.float32))
    ref, _ = solve_navier_stokes(fine, 1e-2, 0.2, 1e-2, 2, fno_forcing(16))
    np.testing.assert_allclose(w, ref[:, :, ::2, ::2], rtol=1e-6, atol=1e-7)
    _, w_unforced = generate_navier_stokes(2, 8, seed=[1, 3], forcing=False, **kw)
    assert not np.allclose(w, w_unforced)


# Per-chunk interface of the three generators (what the dataset fan-out calls), at cheap settings.
CHEAP = {
    darcy: {"fine_factor": 2},
    burgers: {"fine_factor": 2, "T": 0.1, "dt": 0.01},
    navier_stokes: {"fine_factor": 2, "nu": 1e-2, "T": 0.2, "dt": 1e-2, "record_steps": 4},
}
RES = {darcy: 9, burgers: 16, navier_stokes: 8}


@pytest.mark.parametrize("module", list(CHEAP), ids=lambda m: m.__name__)
def test_chunk_arrays_shapes_dtypes_determinism(module):
    kw, res = CHEAP[module], RES[module]
    d = module.describe(res, **kw)
    x, y = module.chunk_arrays(1, 3, res, 7, **kw)
    assert x.shape == (3, *d["input_shape"]) and y.shape == (3, *d["target_shape"])
    assert x.dtype == y.dtype == np.float32 and np.isfinite(x).all() and np.isfinite(y).all()
    assert len(d["grid_bounds"]) == x.ndim - 2
    x2, y2 = module.chunk_arrays(1, 3, res, 7, **d["params"])  # the filled-in params round-trip
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, module.chunk_arrays(2, 3, res, 7, **kw)[0])
    assert not np.array_equal(x, module.chunk_arrays(1, 3, res, 8, **kw)[0])
    assert json.loads(json.dumps(d["params"])) == d["params"]
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['bogus', 'seed'\]"):
        module.describe(res, seed=2, bogus=1, **kw)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['bogus'\]"):
        module.chunk_arrays(0, 1, res, 7, bogus=1)


@pytest.mark.parametrize("module", list(CHEAP), ids=lambda m: m.__name__)
def test_fanout_chunks_equal_chunks_generated_alone(module, tmp_path):
    # Write 7 samples in chunks of 3, out of order, as a fan-out would; read back chunk by chunk.
    kw, res, n, size, seed = CHEAP[module], RES[module], 7, 3, 11
    d = module.describe(res, **kw)
    writer = FieldDatasetWriter(str(tmp_path / "ds"), n, d["input_shape"], d["target_shape"], size,
                                module.__name__, {**d["params"], "seed": seed}, d["grid_bounds"])
    for c in (2, 0, 1):
        writer.write_chunk(c, *module.chunk_arrays(c, min(size, n - c * size), res, seed, **d["params"]))
    writer.finish()
    ds = FieldDataset(str(tmp_path / "ds"))
    x, y = ds.read_chunk(1)
    x1, y1 = module.chunk_arrays(1, size, res, seed, **kw)
    assert np.array_equal(x, x1) and np.array_equal(y, y1)
    assert ds.read_chunk(2)[0].shape == (1, *d["input_shape"])


def test_darcy_chunk_arrays_is_what_write_darcy_dataset_writes(tmp_path):
    darcy.write_darcy_dataset(str(tmp_path / "d"), n=7, res=9, seed=3, chunk_size=3, fine_factor=2)
    ds = FieldDataset(str(tmp_path / "d"))
    for c in range(3):
        a, u = darcy.chunk_arrays(c, min(3, 7 - 3 * c), 9, 3, fine_factor=2, alpha=2, tau=3)
        assert np.array_equal(ds.read_chunk(c)[0], a) and np.array_equal(ds.read_chunk(c)[1], u)
    p = darcy.describe(9, fine_factor=2)["params"]
    assert p == {k: v for k, v in ds.attrs["params"].items() if k not in ("n", "res", "seed", "chunk_size")}
    assert darcy.describe(33)["params"]["fine_resolution"] == 129

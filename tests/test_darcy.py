"""Darcy-flow generator: FD convergence order, GRF properties, dataset shapes and determinism."""

import numpy as np
import pytest
import scipy.fft

from data.darcy import (gaussian_random_field_neumann, generate_darcy, solve_darcy, threshold_coefficient,
                        write_darcy_dataset)
from data.store import FieldDataset


def _manufactured(s):
    """a = 1 + 0.5 sin(pi x) cos(pi y), u = sin(pi x) sin(pi y), f = -div(a grad u) analytically."""
    x = np.linspace(0.0, 1.0, s)
    X, Y = np.meshgrid(x, x, indexing="ij")
    p = np.pi
    a = 1 + 0.5 * np.sin(p * X) * np.cos(p * Y)
    u = np.sin(p * X) * np.sin(p * Y)
    a_x, a_y = 0.5 * p * np.cos(p * X) * np.cos(p * Y), -0.5 * p * np.sin(p * X) * np.sin(p * Y)
    u_x, u_y = p * np.cos(p * X) * np.sin(p * Y), p * np.sin(p * X) * np.cos(p * Y)
    f = -(a_x * u_x + a_y * u_y) + 2 * p**2 * a * u  # u_xx + u_yy = -2 pi^2 u
    return a, f, u


def test_second_order_convergence():
    errors = []
    for s in (33, 65):
        a, f, u = _manufactured(s)
        errors.append(np.abs(solve_darcy(a, f) - u).max())
    assert errors[1] < 1e-3
    assert 3.5 < errors[0] / errors[1] < 4.5


def test_constant_coefficient_matches_series():
    # -lap u = 1, u = 0 on the boundary: u(1/2, 1/2) = 0.0736713532... (Fourier series); with a = 3 it is / 3.
    u = solve_darcy(np.full((65, 65), 3.0), 1.0)
    assert abs(u[32, 32] - 0.07367135 / 3) < 1e-5
    np.testing.assert_allclose(u, u.T, atol=1e-14)  # symmetric problem, symmetric answer


def test_solve_darcy_validates():
    with pytest.raises(ValueError, match="positive"):
        solve_darcy(np.zeros((5, 5)))
    with pytest.raises(ValueError, match=r"shape \(5, 4\)"):
        solve_darcy(np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"forcing f must be a float or shape \(5, 5\)"):
        solve_darcy(np.ones((5, 5)), np.ones((4, 4)))


def test_grf_matches_fno_recipe_and_is_deterministic():
    g1 = gaussian_random_field_neumann(4, 16, rng=np.random.default_rng(7))
    g2 = gaussian_random_field_neumann(4, 16, rng=np.random.default_rng(7))
    assert g1.shape == (4, 16, 16) and np.array_equal(g1, g2)
    assert not np.array_equal(g1, gaussian_random_field_neumann(4, 16, rng=np.random.default_rng(8)))
    # Zero constant mode: each sample has exactly zero mean (DCT coefficient (0,0) is the mean * s).
    np.testing.assert_allclose(g1.mean(axis=(1, 2)), 0.0, atol=1e-12)
    # Forward orthonormal DCT recovers s * coef * xi with FNO's sqrt-eigenvalues (alpha=2, tau=3).
    xi = np.random.default_rng(7).standard_normal((4, 16, 16))
    k1, k2 = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    coef = 3.0 * (np.pi**2 * (k1**2 + k2**2) + 9.0) ** -1.0
    coef[0, 0] = 0
    np.testing.assert_allclose(scipy.fft.dctn(g1, type=2, axes=(1, 2), norm="ortho"), 16 * coef * xi, atol=1e-12)


def test_grf_pointwise_statistics():
    g = gaussian_random_field_neumann(400, 33, rng=np.random.default_rng(0))
    assert abs(g.mean()) < 0.02  # ensemble mean ~ 0 (field std ~ 0.3)
    frac_positive = (g >= 0).mean()
    assert 0.45 < frac_positive < 0.55
    np.testing.assert_array_equal(np.unique(threshold_coefficient(g)), [3.0, 12.0])


def test_generate_darcy_shapes_and_physics():
    a, u = generate_darcy(3, 9, seed=1, fine_factor=2)
    assert a.shape == u.shape == (3, 1, 9, 9) and a.dtype == u.dtype == np.float32
    assert set(np.unique(a)) <= {3.0, 12.0}
    boundary = np.ones((9, 9), bool)
    boundary[1:-1, 1:-1] = False
    assert np.all(u[:, 0][:, boundary] == 0)
    assert np.all(u[:, 0, 1:-1, 1:-1] > 0)  # maximum principle with f = 1 > 0
    # Subsampling: the coarse sample is every 2nd node of the fine solve.
    from data.darcy import fine_resolution
    s = fine_resolution(9, 2)
    grf = gaussian_random_field_neumann(3, s, rng=np.random.default_rng(1))
    a_fine = threshold_coefficient(grf)
    np.testing.assert_array_equal(a[:, 0], a_fine[:, ::2, ::2])
    np.testing.assert_allclose(u[0, 0], solve_darcy(a_fine[0])[::2, ::2], rtol=1e-6)
    a2, u2 = generate_darcy(3, 9, seed=1, fine_factor=2)
    assert np.array_equal(a, a2) and np.array_equal(u, u2)


def test_written_dataset_workers_independent(tmp_path):
    kw = dict(n=7, res=9, seed=3, chunk_size=3, fine_factor=2)
    url1, url2 = str(tmp_path / "w1"), f"file://{tmp_path}/w2"
    write_darcy_dataset(url1, workers=1, **kw)
    write_darcy_dataset(url2, workers=2, **kw)
    d1, d2 = FieldDataset(url1), FieldDataset(url2)
    a1, u1 = d1.read(0, 7)
    a2, u2 = d2.read(0, 7)
    assert a1.shape == u1.shape == (7, 1, 9, 9)
    assert np.array_equal(a1, a2) and np.array_equal(u1, u2)
    assert d1.normalization() == d2.normalization()
    # Chunk i depends only on (seed, i).
    a_c, u_c = generate_darcy(3, 9, seed=[3, 1], fine_factor=2)
    assert np.array_equal(d1.read_chunk(1)[0], a_c) and np.array_equal(d1.read_chunk(1)[1], u_c)

    attrs = d1.attrs
    assert attrs["generator"] == "darcy" and attrs["num_samples"] == 7
    assert attrs["grid"] == {"shape": [9, 9], "bounds": [[0.0, 1.0], [0.0, 1.0]]}
    p = attrs["params"]
    assert (p["alpha"], p["tau"], p["fine_resolution"], p["forcing"]) == (2.0, 3.0, 17, 1.0)
    assert p["coefficient_values"] == {"positive": 12.0, "negative": 3.0}
    norm = d1.normalization()
    np.testing.assert_allclose(norm["inputs"]["mean"], a1.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(norm["inputs"]["std"], a1.std(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(norm["targets"]["mean"], u1.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(norm["targets"]["std"], u1.std(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)

    with pytest.raises(ValueError, match="already exists"):
        write_darcy_dataset(url1, **kw)

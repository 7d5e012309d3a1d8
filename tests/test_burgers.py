"""Burgers generator: ETDRK4 against the Cole-Hopf solution, periodic GRF recipe and statistics, chunk interface."""

import json

import numpy as np
import pytest

from data.burgers import (DEFAULTS, chunk_arrays, describe, gaussian_random_field_periodic, generate_burgers,
                          solve_burgers)

NU, A, B = 0.1, 2.0, 1.0


def _cole_hopf(x, t):
    """u = -2 nu phi_x / phi for the heat solution phi = A + B exp(-4 pi^2 nu t) cos(2 pi x) (A > B > 0)."""
    e = B * np.exp(-4 * np.pi**2 * NU * t)
    return 4 * np.pi * NU * e * np.sin(2 * np.pi * x) / (A + e * np.cos(2 * np.pi * x))


@pytest.mark.parametrize("s", [64, 256])
def test_matches_cole_hopf_to_roundoff(s):
    x = np.arange(s) / s
    u = solve_burgers(np.stack([_cole_hopf(x, 0.0)] * 2), NU, 1.0, DEFAULTS["dt"])
    assert u.shape == (2, s)
    # Fourier coefficients decay like (2 - sqrt 3)^k: the 64-point grid is already exact to roundoff.
    assert np.abs(u - _cole_hopf(x, 1.0)).max() < 1e-12  # measured 1.4e-14 (max |u| ~ 0.014 at T = 1)


def test_etdrk4_is_fourth_order_in_time():
    x = np.arange(64) / 64
    errors = [np.abs(solve_burgers(_cole_hopf(x, 0.0)[None], NU, 1.0, dt)[0] - _cole_hopf(x, 1.0)).max()
              for dt in (0.02, 0.01, 0.005)]
    ratios = errors[0] / errors[1], errors[1] / errors[2]  # measured 14.2, 15.0 (-> 16)
    assert all(12 < r < 17 for r in ratios), (errors, ratios)


def test_solver_validates():
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        solve_burgers(np.zeros(8), NU, 1.0, 0.1)
    with pytest.raises(ValueError, match="nu must be > 0, got 0"):
        solve_burgers(np.zeros((1, 8)), 0.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="T=1.0 is not an integer multiple of dt=0.3"):
        solve_burgers(np.zeros((1, 8)), NU, 1.0, 0.3)


@pytest.mark.parametrize("dim", [1, 2])
def test_grf_matches_fno_recipe_and_is_deterministic(dim):
    s, alpha, tau = 16, 2.5, 7.0
    g = gaussian_random_field_periodic(3, s, dim, alpha, tau, rng=np.random.default_rng(5))
    assert g.shape == (3,) + (s,) * dim and g.dtype == np.float64
    assert np.array_equal(g, gaussian_random_field_periodic(3, s, dim, alpha, tau, rng=np.random.default_rng(5)))
    assert not np.array_equal(g, gaussian_random_field_periodic(3, s, dim, alpha, tau, rng=np.random.default_rng(6)))
    # The first samples do not depend on how many are drawn.
    np.testing.assert_array_equal(g[:2], gaussian_random_field_periodic(2, s, dim, alpha, tau,
                                                                        rng=np.random.default_rng(5)))
    # Zero constant mode: every sample has zero mean.
    np.testing.assert_allclose(g.mean(axis=tuple(range(1, dim + 1))), 0.0, atol=1e-15)
    # fft(Re ifft(c)) = (c_k + conj(c_{-k})) / 2 with c = sqrt_eig * xi, sigma = tau^((2 alpha - dim) / 2).
    z = np.random.default_rng(5).standard_normal((3, 2) + (s,) * dim)
    k = np.fft.fftfreq(s, 1 / s)
    k2 = sum(kk**2 for kk in np.meshgrid(*[k] * dim, indexing="ij"))
    sqrt_eig = s**dim * np.sqrt(2) * tau ** (alpha - dim / 2) * (4 * np.pi**2 * k2 + tau**2) ** (-alpha / 2)
    sqrt_eig.flat[0] = 0
    c = sqrt_eig * (z[:, 0] + 1j * z[:, 1]) / np.sqrt(2)
    axes = tuple(range(1, dim + 1))
    c_minus = np.roll(np.flip(c, axis=axes), 1, axis=axes)  # c_{-k}
    np.testing.assert_allclose(np.fft.fftn(g, axes=axes), (c + c_minus.conj()) / 2, atol=1e-9 * np.abs(c).max())


def test_grf_pointwise_variance_is_the_covariance_trace():
    # Var u(x) = sum_k sigma^2 (4 pi^2 k^2 + tau^2)^-alpha for N(0, sigma^2 (-Lap + tau^2)^-alpha); Burgers' recipe.
    s, n = 64, 4000
    g = gaussian_random_field_periodic(n, s, 1, 2.0, 5.0, 25.0, rng=np.random.default_rng(0))
    k = np.fft.fftfreq(s, 1 / s)[1:]
    var = (625 * (4 * np.pi**2 * k**2 + 25) ** -2.0).sum()
    assert abs(g.var() / var - 1) < 0.05
    assert np.abs(g.mean(axis=0)).max() < 0.05 * np.sqrt(var)  # ensemble mean ~ 0 at every x


def test_generate_burgers_subsamples_the_fine_solve():
    u0, uT = generate_burgers(3, 16, seed=[4, 2], fine_factor=2, T=0.1, dt=0.01)
    assert u0.shape == uT.shape == (3, 1, 16) and u0.dtype == uT.dtype == np.float32
    fine = gaussian_random_field_periodic(3, 32, 1, 2.0, 5.0, 25.0, rng=np.random.default_rng([4, 2]))
    np.testing.assert_array_equal(u0[:, 0], fine[:, ::2].astype(np.float32))
    np.testing.assert_allclose(uT[:, 0], solve_burgers(fine, 0.1, 0.1, 0.01)[:, ::2], rtol=1e-6)
    # Viscous Burgers: max |u| does not grow, the mean (zero) is conserved.
    assert np.abs(uT).max() <= np.abs(fine).max()
    np.testing.assert_allclose(uT.astype(np.float64).mean(axis=-1), 0.0, atol=1e-6)


def test_describe_fills_defaults_and_rejects_unknown():
    d = describe(256)
    assert d["input_shape"] == d["target_shape"] == (1, 256) and d["grid_bounds"] == [[0.0, 1.0]]
    assert d["params"] == {"fine_factor": 4, "nu": 0.1, "T": 1.0, "dt": 1e-3, "alpha": 2.0, "tau": 5.0,
                           "sigma": 25.0, "fine_resolution": 1024}
    assert json.loads(json.dumps(d["params"])) == d["params"]
    assert describe(64, nu=0.05, fine_factor=2.0)["params"]["fine_resolution"] == 128
    # The filled-in params round-trip (derived entries included).
    assert describe(256, **d["params"]) == d
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['visc'\]"):
        describe(64, visc=0.1)
    with pytest.raises(ValueError, match=r"\['fine_resolution'\] disagree"):
        describe(64, fine_resolution=1024)
    with pytest.raises(ValueError, match="fine_factor must be an integer, got 2.5"):
        describe(64, fine_factor=2.5)
    with pytest.raises(ValueError, match=r"must be > 0, got \{'nu': -0.1\}"):
        describe(64, nu=-0.1)
    with pytest.raises(ValueError, match="not an integer multiple"):
        chunk_arrays(0, 2, 64, 0, dt=0.3)

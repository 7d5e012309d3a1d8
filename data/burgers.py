"""1-D viscous Burgers, the benchmark of Li et al. 2021, "Fourier Neural Operator for Parametric PDEs".

    u_t + (u^2 / 2)_x = nu u_xx,   x in [0, 1) periodic,   t in (0, T],   nu = 0.1,  T = 1,

with u0 ~ N(0, 625 (-Laplacian + 25 I)^-2) (zero mean). The operator learnt is u0 -> u(T).
Solved pseudo-spectrally (2/3 dealiasing) with ETDRK4 in time (Cox & Matthews 2002, coefficients by
the contour integrals of Kassam & Trefethen 2005, "Fourth-order time-stepping for stiff PDEs") on a fine
grid, then subsampled. FNO solved on 8192 points with chebfun's spin (also ETDRK4) and subsampled to 1024.
The solution is smooth (nu = 0.1), so the default fine grid is 4x the stored one, and dt = 1e-3 puts the
time error (~3e-9 of max |u(T)| for these initial conditions) far below float32 storage precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Generator parameters (the keyword arguments of generate_burgers) and their defaults.
DEFAULTS = {"fine_factor": 4, "nu": 0.1, "T": 1.0, "dt": 1e-3, "alpha": 2.0, "tau": 5.0, "sigma": 25.0}


def gaussian_random_field_periodic(n_samples: int, s: int, dim: int = 1, alpha: float = 2.0, tau: float = 5.0,
                                   sigma: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Samples (n, s, ..., s) of N(0, sigma^2 (-Laplacian + tau^2)^(-alpha)) on the periodic unit cube [0, 1)^dim.

    FNO's GaussianRF (random_fields.py), with k the integer wavenumbers in FFT order:

        sqrt_eig_k = s^dim * sqrt(2) * sigma * (4 pi^2 |k|^2 + tau^2)^(-alpha/2),   sqrt_eig_0 = 0 (zero mean)
        U = Re ifftn( sqrt_eig * xi ),   xi ~ CN(0, 1),   sigma = tau^((2 alpha - dim) / 2) if None.

    xi as FNO's torch.randn(..., dtype=cfloat) (E|xi|^2 = 1) gives exactly the covariance above; FNO's
    original torch < 1.8 code drew real and imaginary parts N(0, 1), i.e. fields sqrt(2) larger.
    """
    if n_samples < 1 or s < 2 or dim < 1:
        raise ValueError(f"gaussian_random_field_periodic: need n_samples >= 1, s >= 2, dim >= 1; "
                         f"got {n_samples}, {s}, {dim}")
    rng = np.random.default_rng() if rng is None else rng
    sigma = tau ** (0.5 * (2 * alpha - dim)) if sigma is None else sigma
    k = np.fft.fftfreq(s, 1.0 / s)
    k2 = sum(kk**2 for kk in np.meshgrid(*[k] * dim, indexing="ij"))  # (s,) * dim
    sqrt_eig = s**dim * math.sqrt(2.0) * sigma * (4 * math.pi**2 * k2 + tau**2) ** (-alpha / 2)
    sqrt_eig.flat[0] = 0.0
    re_im = rng.standard_normal((n_samples, 2, *[s] * dim))  # sample-major: the first m samples of n are those of m
    xi = (re_im[:, 0] + 1j * re_im[:, 1]) / math.sqrt(2.0)  # CN(0, 1): E|xi|^2 = 1
    return np.fft.ifftn(sqrt_eig * xi, axes=tuple(range(1, dim + 1))).real


def time_steps(T: float, dt: float) -> int:
    """Number of steps of size dt that reach T exactly (ValueError if T/dt is not an integer)."""
    if not (T > 0 and dt > 0):
        raise ValueError(f"need T > 0 and dt > 0, got T={T}, dt={dt}")
    steps = round(T / dt)
    if steps < 1 or abs(steps * dt - T) > 1e-9 * T:
        raise ValueError(f"T={T} is not an integer multiple of dt={dt}")
    return steps


def etdrk4_coefficients(lin: np.ndarray, dt: float, m: int = 64) -> tuple[np.ndarray, ...]:
    """ETDRK4 weights for v_t = lin * v + N(v), lin diagonal (as in Kassam & Trefethen 2005, kursiv.m).

    The phi-functions are averaged over m points on a unit circle around each dt*lin, which avoids the
    cancellation of the direct formulas as dt*lin -> 0. Returns E, E2, Q, f1, f2, f3.
    """
    z = dt * np.asarray(lin, np.float64)[..., None] + np.exp(2j * np.pi * (np.arange(m) + 0.5) / m)  # (..., m)
    q = dt * np.mean((np.exp(z / 2) - 1) / z, axis=-1).real
    f1 = dt * np.mean((-4 - z + np.exp(z) * (4 - 3 * z + z**2)) / z**3, axis=-1).real
    f2 = dt * np.mean((2 + z + np.exp(z) * (z - 2)) / z**3, axis=-1).real
    f3 = dt * np.mean((-4 - 3 * z - z**2 + np.exp(z) * (4 - z)) / z**3, axis=-1).real
    return np.exp(dt * lin), np.exp(dt * lin / 2), q, f1, f2, f3


def solve_burgers(u0: np.ndarray, nu: float, T: float, dt: float) -> np.ndarray:
    """u(T) (n, s) for u0 (n, s) on the periodic grid x_j = j / s, by pseudo-spectral ETDRK4.

    In Fourier space v = fft(u):  v_t = -nu (2 pi k)^2 v  -  (i 2 pi k / 2) * D fft(ifft(v)^2),
    D the 2/3 dealiasing mask (|k| <= s/3, as FNO); the viscous term is integrated exactly.
    """
    u0 = np.asarray(u0, dtype=np.float64)
    if u0.ndim != 2 or u0.shape[1] < 4:
        raise ValueError(f"solve_burgers: u0 must be (n, s) with s >= 4, got shape {u0.shape}")
    if not nu > 0:
        raise ValueError(f"solve_burgers: nu must be > 0, got {nu}")
    steps = time_steps(T, dt)
    s = u0.shape[1]
    k = np.fft.rfftfreq(s, 1.0 / s)  # 0 .. s/2
    E, E2, Q, f1, f2, f3 = etdrk4_coefficients(-nu * (2 * np.pi * k) ** 2, dt)
    dealias = np.abs(k) <= (2.0 / 3.0) * (s // 2)
    g = -0.5j * 2 * np.pi * k * dealias  # -(i 2 pi k / 2) D

    def nonlinear(v: np.ndarray) -> np.ndarray:
        return g * np.fft.rfft(np.fft.irfft(v, n=s) ** 2)

    v = np.fft.rfft(u0)  # (n, s//2 + 1)
    for _ in range(steps):
        nv = nonlinear(v)
        a = E2 * v + Q * nv
        na = nonlinear(a)
        b = E2 * v + Q * na
        nb = nonlinear(b)
        c = E2 * a + Q * (2 * nb - nv)
        v = E * v + f1 * nv + 2 * f2 * (na + nb) + f3 * nonlinear(c)
    return np.fft.irfft(v, n=s)


def _parameters(res: int, params: dict) -> dict:
    """Defaults filled in, types normalised, values checked; derived entries passed back in must agree."""
    derived = {"fine_resolution"}
    unknown = sorted(set(params) - set(DEFAULTS) - derived)
    if unknown:
        raise ValueError(f"burgers: unknown parameter(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **{k: v for k, v in params.items() if k in DEFAULTS}}
    if isinstance(p["fine_factor"], bool) or int(p["fine_factor"]) != p["fine_factor"]:
        raise ValueError(f"burgers: fine_factor must be an integer, got {p['fine_factor']!r}")
    p = {name: int(v) if name == "fine_factor" else float(v) for name, v in p.items()}
    if res < 4 or p["fine_factor"] < 1:
        raise ValueError(f"burgers: need res >= 4 and fine_factor >= 1, got res={res}, "
                         f"fine_factor={p['fine_factor']}")
    bad = {name: p[name] for name in ("nu", "alpha", "tau", "sigma") if not p[name] > 0}
    if bad:
        raise ValueError(f"burgers: parameters must be > 0, got {bad}")
    time_steps(p["T"], p["dt"])
    p["fine_resolution"] = res * p["fine_factor"]
    stale = sorted(name for name in derived & set(params) if params[name] != p[name])
    if stale:
        raise ValueError(f"burgers: derived parameter(s) {stale} disagree with the values computed from the others")
    return p


def generate_burgers(n: int, res: int, seed: int | Sequence[int], **params) -> tuple[np.ndarray, np.ndarray]:
    """n Burgers pairs (u0, u(T)), each float32 (n, 1, res), solved on res * fine_factor points.

    Deterministic in `seed` (anything np.random.default_rng accepts, e.g. [seed, chunk]); params as DEFAULTS.
    """
    if n < 1:
        raise ValueError(f"generate_burgers: need n >= 1, got {n}")
    p = _parameters(res, params)
    s, ff = p["fine_resolution"], p["fine_factor"]
    u0 = gaussian_random_field_periodic(n, s, 1, p["alpha"], p["tau"], p["sigma"], np.random.default_rng(seed))
    uT = solve_burgers(u0, p["nu"], p["T"], p["dt"])
    return u0[:, None, ::ff].astype(np.float32), uT[:, None, ::ff].astype(np.float32)


def describe(res: int, **params) -> dict:
    """Sample shapes, grid bounds and the full parameter dict (defaults filled in) of a Burgers dataset."""
    return {"input_shape": (1, res), "target_shape": (1, res), "grid_bounds": [[0.0, 1.0]],
            "params": _parameters(res, params)}


def chunk_arrays(chunk: int, count: int, res: int, seed: int, **params) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `chunk` of a dataset: `count` pairs float32 (count, 1, res) from np.random.default_rng([seed, chunk])."""
    if chunk < 0:
        raise ValueError(f"burgers: chunk must be >= 0, got {chunk}")
    return generate_burgers(count, res, [seed, chunk], **params)

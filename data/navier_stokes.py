"""2-D incompressible Navier-Stokes on the unit torus, the benchmark of Li et al. 2021, "Fourier Neural
Operator for Parametric PDEs", in vorticity form:

    w_t + u . grad w = nu Lap w + f,   u = (psi_y, -psi_x),   -Lap psi = w,   (x, y) in [0, 1)^2 periodic,
    f(x, y) = 0.1 (sin 2 pi (x + y) + cos 2 pi (x + y)),

with w0 from FNO's GaussianRF(2, s, alpha=2.5, tau=7), i.e. N(0, 7^3 (-Lap + 49 I)^-2.5). The operator learnt
maps w0 (or w on an initial time window) to the trajectory w(t).

Pseudo-spectral in space with 2/3 dealiasing of u . grad w; in time Crank-Nicolson for nu Lap w and
second-order Adams-Bashforth for the advection (CNAB2; Peyret 2002, "Spectral Methods for Incompressible
Viscous Flow", 4.5). FNO's `navier_stokes_2d` uses Crank-Nicolson with forward Euler for the advection,
a first-order scheme, at dt = 1e-4; CNAB2 costs the same per step and is second order, so the default
dt = 1e-3 is both 10x cheaper and more accurate than FNO's setting.

FNO's datasets: solved on 256^2 at dt = 1e-4 and subsampled to 64^2 (fine_factor 4), nu = 1e-3 / 1e-4 / 1e-5
with T = 50 / 30 / 20, one snapshot per time unit (ns_V1e-3_N5000_T50 holds 50). The defaults are the
nu = 1e-3 set (T = 50, record_steps = 50) except dt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.burgers import gaussian_random_field_periodic, time_steps

# Generator parameters (the keyword arguments of generate_navier_stokes) and their defaults.
# sigma None means FNO's tau^(alpha - 1); describe() reports the value used.
DEFAULTS = {"fine_factor": 4, "nu": 1e-3, "T": 50.0, "dt": 1e-3, "record_steps": 50, "alpha": 2.5, "tau": 7.0,
            "sigma": None, "forcing": True}


def fno_forcing(s: int) -> np.ndarray:
    """f (s, s) = 0.1 (sin 2 pi (x + y) + cos 2 pi (x + y)) at x_i = i / s (axis 0), y_j = j / s (axis 1)."""
    x = np.arange(s) / s
    xy = x[:, None] + x[None, :]
    return 0.1 * (np.sin(2 * np.pi * xy) + np.cos(2 * np.pi * xy))


def solve_navier_stokes(w0: np.ndarray, nu: float, T: float, dt: float, record_steps: int = 1,
                        forcing: np.ndarray | None = None, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Vorticity w0 (n, s, s) -> (snapshots (n, record_steps, s/stride, s/stride), times (record_steps,)).

    Snapshot r is w at t_r = (r + 1) T / record_steps, subsampled as w[::stride, ::stride]. In Fourier space
    (wavenumbers k, lam = 4 pi^2 |k|^2, A = D fft(u . grad w) with D the 2/3 dealiasing mask, as FNO), CNAB2:

        (1 + dt nu lam / 2) w^{n+1} = (1 - dt nu lam / 2) w^n + dt (f - 3/2 A^n + 1/2 A^{n-1}),   A^{-1} = A^0.
    """
    w0 = np.asarray(w0, dtype=np.float64)
    if w0.ndim != 3 or w0.shape[1] != w0.shape[2] or w0.shape[1] < 4:
        raise ValueError(f"solve_navier_stokes: w0 must be (n, s, s) with s >= 4, got shape {w0.shape}")
    s = w0.shape[1]
    steps = time_steps(T, dt)
    if record_steps < 1 or steps % record_steps:
        raise ValueError(f"solve_navier_stokes: record_steps={record_steps} must divide the {steps} time steps")
    if not nu >= 0 or stride < 1 or s % stride:
        raise ValueError(f"solve_navier_stokes: need nu >= 0 and stride dividing s={s}; got nu={nu}, stride={stride}")
    f = np.zeros((s, s)) if forcing is None else np.asarray(forcing, dtype=np.float64)
    if f.shape != (s, s):
        raise ValueError(f"solve_navier_stokes: forcing must be shape {(s, s)}, got {f.shape}")

    kx = np.fft.fftfreq(s, 1.0 / s)[:, None]  # (s, 1)
    ky = np.fft.rfftfreq(s, 1.0 / s)[None, :]  # (1, s//2 + 1)
    lam = 4 * np.pi**2 * (kx**2 + ky**2)
    dealias = (np.abs(kx) <= (2.0 / 3.0) * (s // 2)) & (np.abs(ky) <= (2.0 / 3.0) * (s // 2))
    # d/dx, d/dy; the Nyquist wavenumber (+-s/2, no sign) has no odd derivative on the grid.
    ikx = 2j * np.pi * np.where(np.abs(kx) == s / 2, 0.0, kx)
    iky = 2j * np.pi * np.where(np.abs(ky) == s / 2, 0.0, ky)
    inv_lam = np.divide(1.0, lam, out=np.zeros_like(lam), where=lam > 0)  # psi_h = w_h / lam; mean of psi: 0
    # u = psi_y, v = -psi_x, psi = w / lam: each row maps w_h to the transform of (u, v, w_x, w_y).
    to_grad = np.stack(np.broadcast_arrays(iky * inv_lam, -ikx * inv_lam, ikx, iky))  # (4, s, s//2 + 1)
    keep, gain = (1 - 0.5 * dt * nu * lam) / (1 + 0.5 * dt * nu * lam), dt / (1 + 0.5 * dt * nu * lam)
    f_h = np.fft.rfft2(f)

    def advection(w_h: np.ndarray) -> np.ndarray:  # (n, s, s//2 + 1) -> D fft(u . grad w)
        grads = np.fft.irfft2((to_grad * w_h[:, None]).reshape(-1, s, s // 2 + 1), s=(s, s))
        u, v, w_x, w_y = grads.reshape(-1, 4, s, s).transpose(1, 0, 2, 3)
        return dealias * np.fft.rfft2(u * w_x + v * w_y)

    every = steps // record_steps
    out = np.empty((w0.shape[0], record_steps, s // stride, s // stride))
    w_h = np.fft.rfft2(w0)
    a_prev = None
    for step in range(1, steps + 1):
        a = advection(w_h)
        a_prev = a if a_prev is None else a_prev
        w_h = keep * w_h + gain * (f_h - 1.5 * a + 0.5 * a_prev)
        a_prev = a
        if step % every == 0:
            out[:, step // every - 1] = np.fft.irfft2(w_h, s=(s, s))[:, ::stride, ::stride]
    return out, record_times(T, record_steps)


def record_times(T: float, record_steps: int) -> np.ndarray:
    """The recorded times (r + 1) T / record_steps, r = 0 .. record_steps - 1."""
    return T * np.arange(1, record_steps + 1) / record_steps


def _parameters(res: int, params: dict) -> dict:
    """Defaults filled in, types normalised, values checked; derived entries passed back in must agree."""
    derived = {"fine_resolution", "times"}
    unknown = sorted(set(params) - set(DEFAULTS) - derived)
    if unknown:
        raise ValueError(f"navier_stokes: unknown parameter(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **{k: v for k, v in params.items() if k in DEFAULTS}}
    for name in ("fine_factor", "record_steps"):
        if int(p[name]) != p[name] or isinstance(p[name], bool):
            raise ValueError(f"navier_stokes: {name} must be an integer, got {p[name]!r}")
        p[name] = int(p[name])
    if not isinstance(p["forcing"], (bool, np.bool_)):
        raise ValueError(f"navier_stokes: forcing must be True or False, got {p['forcing']!r}")
    p["forcing"] = bool(p["forcing"])
    for name in ("nu", "T", "dt", "alpha", "tau"):
        p[name] = float(p[name])
    p["sigma"] = p["tau"] ** (p["alpha"] - 1.0) if p["sigma"] is None else float(p["sigma"])
    if res < 4 or p["fine_factor"] < 1:
        raise ValueError(f"navier_stokes: need res >= 4 and fine_factor >= 1, got res={res}, "
                         f"fine_factor={p['fine_factor']}")
    bad = {name: p[name] for name in ("alpha", "tau", "sigma") if not p[name] > 0}
    if not p["nu"] >= 0:
        bad["nu"] = p["nu"]
    if bad:
        raise ValueError(f"navier_stokes: parameters out of range (nu >= 0, others > 0): {bad}")
    steps = time_steps(p["T"], p["dt"])
    if p["record_steps"] < 1 or steps % p["record_steps"]:
        raise ValueError(f"navier_stokes: record_steps={p['record_steps']} must divide the {steps} time steps "
                         f"(T={p['T']}, dt={p['dt']})")
    p["fine_resolution"] = res * p["fine_factor"]
    p["times"] = record_times(p["T"], p["record_steps"]).tolist()
    stale = sorted(name for name in derived & set(params)
                   if np.ravel(params[name]).tolist() != np.ravel(p[name]).tolist())
    if stale:
        raise ValueError(f"navier_stokes: derived parameter(s) {stale} disagree with the values computed from the "
                         "others")
    return p


def generate_navier_stokes(n: int, res: int, seed: int | Sequence[int],
                           **params) -> tuple[np.ndarray, np.ndarray]:
    """n trajectories: w0 float32 (n, 1, res, res) and w at the recorded times float32 (n, record_steps, res, res).

    Solved on res * fine_factor points per side and subsampled. Deterministic in `seed` (anything
    np.random.default_rng accepts, e.g. [seed, chunk]); params as DEFAULTS.
    """
    if n < 1:
        raise ValueError(f"generate_navier_stokes: need n >= 1, got {n}")
    p = _parameters(res, params)
    s, ff = p["fine_resolution"], p["fine_factor"]
    w0 = gaussian_random_field_periodic(n, s, 2, p["alpha"], p["tau"], p["sigma"], np.random.default_rng(seed))
    w, _ = solve_navier_stokes(w0, p["nu"], p["T"], p["dt"], p["record_steps"],
                               fno_forcing(s) if p["forcing"] else None, stride=ff)
    return w0[:, None, ::ff, ::ff].astype(np.float32), w.astype(np.float32)


def describe(res: int, **params) -> dict:
    """Sample shapes (targets: one channel per recorded time), grid bounds and the full parameter dict."""
    p = _parameters(res, params)
    return {"input_shape": (1, res, res), "target_shape": (p["record_steps"], res, res),
            "grid_bounds": [[0.0, 1.0], [0.0, 1.0]], "params": p}


def chunk_arrays(chunk: int, count: int, res: int, seed: int, **params) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `chunk` of a dataset: `count` trajectories from np.random.default_rng([seed, chunk])."""
    if chunk < 0:
        raise ValueError(f"navier_stokes: chunk must be >= 0, got {chunk}")
    return generate_navier_stokes(count, res, [seed, chunk], **params)

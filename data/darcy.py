"""2-D Darcy flow, the benchmark of Li et al. 2021, "Fourier Neural Operator for Parametric PDEs".

    -div( a(x) grad u(x) ) = f(x),   x in (0,1)^2,   u = 0 on the boundary,   f = 1,

with a piecewise-constant coefficient a = psi(GRF): 12 where a Gaussian random field
N(0, tau^(2 alpha - 2) (-Laplacian + tau^2)^(-alpha)) with Neumann boundary conditions is >= 0,
and 3 where it is < 0. The operator learnt is a -> u. As in FNO, data are solved on a fine grid
and subsampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft
import scipy.sparse
import scipy.sparse.linalg


A_POSITIVE = 12.0  # coefficient where GRF >= 0
A_NEGATIVE = 3.0  # coefficient where GRF < 0
FORCING = 1.0


def gaussian_random_field_neumann(n_samples: int, s: int, alpha: float = 2.0, tau: float = 3.0,
                                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Samples (n, s, s) of FNO's GRF (their GRF.m): a Karhunen-Loeve expansion in the cosine basis.

        sqrt-eigenvalue  c_k = tau^(alpha-1) * (pi^2 (k1^2 + k2^2) + tau^2)^(-alpha/2),  k1, k2 = 0..s-1
        U = idct2( s * c * xi ),  xi ~ N(0, 1),  c_00 = 0 (zero-mean field)

    with MATLAB's idct2 (orthonormal inverse DCT-II).
    """
    if n_samples < 1 or s < 2:
        raise ValueError(f"gaussian_random_field_neumann: need n_samples >= 1 and s >= 2, got {n_samples}, {s}")
    rng = np.random.default_rng() if rng is None else rng
    k = np.arange(s)
    k1, k2 = np.meshgrid(k, k, indexing="ij")
    coef = tau ** (alpha - 1) * (np.pi**2 * (k1**2 + k2**2) + tau**2) ** (-alpha / 2)  # (s, s)
    coef[0, 0] = 0.0
    xi = rng.standard_normal((n_samples, s, s))
    return scipy.fft.idctn(s * coef * xi, type=2, axes=(1, 2), norm="ortho")  # (n, s, s)


def threshold_coefficient(grf: np.ndarray) -> np.ndarray:
    """FNO's psi: 12 where the field is >= 0, 3 where it is < 0."""
    return np.where(grf >= 0, A_POSITIVE, A_NEGATIVE)


def solve_darcy(a: np.ndarray, f: float | np.ndarray = FORCING) -> np.ndarray:
    """Solve -div(a grad u) = f on [0,1]^2 with u = 0 on the boundary; returns u (s, s).

    The grid includes the boundary nodes, h = 1/(s-1). Second-order 5-point finite differences
    with the coefficient at half points taken as the arithmetic mean, e.g. a_{i+1/2,j} = (a_ij + a_{i+1,j})/2:

        [ -a_{i+1/2,j}(u_{i+1,j} - u_ij) + a_{i-1/2,j}(u_ij - u_{i-1,j})
          -a_{i,j+1/2}(u_{i,j+1} - u_ij) + a_{i,j-1/2}(u_ij - u_{i,j-1}) ] / h^2 = f_ij

    assembled as one sparse symmetric matrix over the (s-2)^2 interior nodes and solved directly.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
        raise ValueError(f"solve_darcy: coefficient a must be square (s, s) with s >= 3, got shape {a.shape}")
    if not np.all(a > 0):
        raise ValueError(f"solve_darcy: coefficient a must be positive everywhere, min is {a.min()}")
    s = a.shape[0]
    f = np.broadcast_to(np.asarray(f, dtype=np.float64), (s, s)) if np.ndim(f) == 0 else np.asarray(f, np.float64)
    if f.shape != (s, s):
        raise ValueError(f"solve_darcy: forcing f must be a float or shape {(s, s)}, got shape {f.shape}")
    h2 = (1.0 / (s - 1)) ** 2
    m = s - 2  # interior nodes per side

    ax = 0.5 * (a[1:, 1:-1] + a[:-1, 1:-1])  # (s-1, m): a at (i+1/2, j) for i = 0..s-2
    ay = 0.5 * (a[1:-1, 1:] + a[1:-1, :-1])  # (m, s-1): a at (i, j+1/2)
    diag = (ax[1:] + ax[:-1] + ay[:, 1:] + ay[:, :-1]) / h2  # (m, m)

    idx = np.arange(m * m).reshape(m, m)
    off_x = -ax[1:-1] / h2  # (m-1, m): couples interior (i, j) and (i+1, j)
    off_y = -ay[:, 1:-1] / h2  # (m, m-1): couples interior (i, j) and (i, j+1)
    rows = np.concatenate([idx.ravel(), idx[:-1].ravel(), idx[1:].ravel(), idx[:, :-1].ravel(), idx[:, 1:].ravel()])
    cols = np.concatenate([idx.ravel(), idx[1:].ravel(), idx[:-1].ravel(), idx[:, 1:].ravel(), idx[:, :-1].ravel()])
    vals = np.concatenate([diag.ravel(), off_x.ravel(), off_x.ravel(), off_y.ravel(), off_y.ravel()])
    matrix = scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(m * m, m * m))

    u = np.zeros((s, s))
    # The matrix is symmetric, so order on the pattern of A^T + A: ~1.5x faster than the default COLAMD.
    sol = scipy.sparse.linalg.spsolve(matrix, f[1:-1, 1:-1].ravel(), permc_spec="MMD_AT_PLUS_A")
    u[1:-1, 1:-1] = sol.reshape(m, m)
    return u


def fine_resolution(res: int, fine_factor: int) -> int:
    """Fine grid size whose every fine_factor-th node lands on the res-point grid (both include the boundary)."""
    return fine_factor * (res - 1) + 1


def generate_darcy(n: int, res: int, seed: int | Sequence[int], fine_factor: int = 4, alpha: float = 2.0,
                   tau: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """n Darcy pairs (a, u), each float32 (n, 1, res, res), solved at fine_resolution(res, fine_factor).

    Deterministic in `seed` (anything np.random.default_rng accepts, e.g. [seed, chunk]).
    """
    if n < 1 or res < 3 or fine_factor < 1:
        raise ValueError(f"generate_darcy: need n >= 1, res >= 3, fine_factor >= 1; got {n}, {res}, {fine_factor}")
    s = fine_resolution(res, fine_factor)
    rng = np.random.default_rng(seed)
    a_fine = threshold_coefficient(gaussian_random_field_neumann(n, s, alpha, tau, rng))  # (n, s, s)
    u_fine = np.stack([solve_darcy(a_k, FORCING) for a_k in a_fine])  # (n, s, s)
    sub = (slice(None), None, slice(None, None, fine_factor), slice(None, None, fine_factor))
    return a_fine[sub].astype(np.float32), u_fine[sub].astype(np.float32)


def write_darcy_dataset(url: str, n: int, res: int, seed: int, chunk_size: int = 64, fine_factor: int = 4,
                        storage_options: dict | None = None, workers: int = 1, overwrite: bool = False,
                        progress: bool = False, alpha: float = 2.0, tau: float = 3.0) -> None:
    """Generate n Darcy samples into a dataset group at `url`: `data.generate.generate_dataset` for Darcy,
    in this process (workers = 1) or as Ray tasks, one per chunk, at most `workers` at once. Chunk i is drawn from
    np.random.default_rng([seed, i]) alone, so the dataset does not depend on `workers`."""
    if workers < 1:
        raise ValueError(f"write_darcy_dataset: workers must be >= 1, got {workers}")
    from data.generate import generate_dataset
    from data.store import store_is_empty
    if not overwrite and not store_is_empty(url, storage_options):
        raise ValueError(f"{url}: store already exists and is not empty; pass overwrite=True to replace it "
                         "(`fieldtrain data generate` resumes an interrupted generation instead)")
    generate_dataset("darcy", url, n, res, seed=seed, chunk_size=chunk_size,
                     params={"fine_factor": fine_factor, "alpha": alpha, "tau": tau},
                     storage_options=storage_options, overwrite=overwrite, progress=progress, workers=workers)


# Per-chunk interface of the dataset fan-out (same as data/burgers.py and data/navier_stokes.py).
DEFAULTS = {"fine_factor": 4, "alpha": 2.0, "tau": 3.0}


def _parameters(res: int, params: dict) -> dict:
    """Defaults filled in, types normalised, values checked; derived entries passed back in must agree."""
    derived = {"fine_resolution", "coefficient_values", "forcing", "boundary", "discretisation"}
    unknown = sorted(set(params) - set(DEFAULTS) - derived)
    if unknown:
        raise ValueError(f"darcy: unknown parameter(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **{k: v for k, v in params.items() if k in DEFAULTS}}
    if isinstance(p["fine_factor"], bool) or int(p["fine_factor"]) != p["fine_factor"]:
        raise ValueError(f"darcy: fine_factor must be an integer, got {p['fine_factor']!r}")
    p = {"fine_factor": int(p["fine_factor"]), "alpha": float(p["alpha"]), "tau": float(p["tau"])}
    if res < 3 or p["fine_factor"] < 1:
        raise ValueError(f"darcy: need res >= 3 and fine_factor >= 1, got res={res}, fine_factor={p['fine_factor']}")
    p.update({"fine_resolution": fine_resolution(res, p["fine_factor"]),
              "coefficient_values": {"positive": A_POSITIVE, "negative": A_NEGATIVE}, "forcing": FORCING,
              "boundary": "u = 0 (Dirichlet)", "discretisation": "5-point FD, arithmetic-mean half-point a"})
    stale = sorted(name for name in derived & set(params) if params[name] != p[name])
    if stale:
        raise ValueError(f"darcy: derived parameter(s) {stale} disagree with the values computed from the others")
    return p


def describe(res: int, **params) -> dict:
    """Sample shapes, grid bounds and the full parameter dict (defaults filled in) of a Darcy dataset."""
    return {"input_shape": (1, res, res), "target_shape": (1, res, res), "grid_bounds": [[0.0, 1.0], [0.0, 1.0]],
            "params": _parameters(res, params)}


def chunk_arrays(chunk: int, count: int, res: int, seed: int, **params) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `chunk` of a dataset, as write_darcy_dataset writes it: generate_darcy(count, res, [seed, chunk], ...)."""
    if chunk < 0:
        raise ValueError(f"darcy: chunk must be >= 0, got {chunk}")
    p = _parameters(res, params)
    return generate_darcy(count, res, [seed, chunk], p["fine_factor"], p["alpha"], p["tau"])

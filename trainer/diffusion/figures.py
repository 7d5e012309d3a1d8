"""PNG figures for sampling runs: samples against the truth, energy spectra, error against NFE.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global
backend change), so they are safe to write from training processes and tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _array(a) -> np.ndarray:
    """A tensor or array as float64 numpy."""
    a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64)
    return a


def _field(a, name: str) -> np.ndarray:
    a = _array(a)
    if a.ndim == 3:
        a = a[0]
    if a.ndim not in (1, 2):
        raise ValueError(f"{name} must be a 1-D (n) or 2-D (H, W) field, or (C, ...) of one; got {a.shape}")
    return a


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=80)
    return path


def plot_samples(path, cond, truth, samples, *, n_members: int = 3, title: str | None = None) -> Path:
    """One row: condition, truth, the first `n_members` members, ensemble mean, std and |mean - truth|.

    truth is one field, (n), (H, W) or (C, ...) of those (channel 0 is drawn); samples is (M, *truth.shape);
    cond is a field of the same shape, with nan off the observed points for sparse observations (see
    PointObservation.scatter), or None.
    """
    truth_a = _field(truth, "truth")
    samples_a = _array(samples)
    if samples_a.ndim == truth_a.ndim + 2:
        samples_a = samples_a[:, 0]
    if samples_a.shape[1:] != truth_a.shape:
        raise ValueError(f"samples must be (M, *truth.shape), got {samples_a.shape} for truth {truth_a.shape}")
    mean, std = samples_a.mean(0), samples_a.std(0)
    panels = [] if cond is None else [("condition", _field(cond, "cond"), "value")]
    panels += [("truth", truth_a, "value")]
    panels += [(f"member {i}", s, "value") for i, s in enumerate(samples_a[:n_members])]
    panels += [("ensemble mean", mean, "value"), ("ensemble std", std, "std"),
               ("|mean - truth|", np.abs(mean - truth_a), "error")]
    lo, hi = np.nanmin(truth_a), np.nanmax(truth_a)
    fig = Figure(figsize=(2.2 * len(panels), 2.4 if truth_a.ndim == 2 else 2.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, a, kind) in zip(axes, panels):
        ax.set_title(name, fontsize=8)
        if a.ndim == 1:
            ax.plot(a, ".-" if name == "condition" else "-", lw=1, ms=3)
            ax.tick_params(labelsize=6)
            continue
        vmin, vmax = (lo, hi) if kind == "value" else (None, None)
        image = ax.imshow(a, cmap="RdBu_r" if kind == "value" else "viridis", vmin=vmin, vmax=vmax)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.7).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_spectra(path, k, spectra: dict[str, object], *, title: str = "energy spectrum") -> Path:
    """Log-log E(k) for each named spectrum (1-D arrays over the wavenumbers k); k = 0 is left out."""
    k = _array(k)
    fig = Figure(figsize=(4.5, 3.5), layout="constrained")
    ax = fig.subplots()
    for name, e in spectra.items():
        e = _array(e)
        if e.shape != k.shape:
            raise ValueError(f"spectra[{name!r}] has shape {e.shape}, k has {k.shape}")
        ax.loglog(k[k > 0], e[k > 0], label=name)
    ax.set_xlabel("wavenumber k"), ax.set_ylabel("E(k)"), ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_error_vs_nfe(path, rows: list[dict], *, title: str = "error vs NFE", ylabel: str = "error",
                      xlabel: str = "NFE") -> Path:
    """One log-log line per rows' "method", through its ("nfe", "error") points sorted by nfe."""
    for row in rows:
        missing = {"method", "nfe", "error"} - set(row)
        if missing:
            raise ValueError(f"each row needs keys 'method', 'nfe', 'error'; missing {sorted(missing)} in {row}")
    fig = Figure(figsize=(4.5, 3.5), layout="constrained")
    ax = fig.subplots()
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted((row["nfe"], row["error"]) for row in rows if row["method"] == method)
        ax.loglog(*zip(*points), "o-", ms=3, label=str(method))
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)

"""Figures of a density sampler: samples over the target's density (2-D), or marginals against exact samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure


def plot_sampler(path, target, x: torch.Tensor, exact: torch.Tensor | None, *, title: str = "") -> Path:
    """2-D targets: the samples over contours of log pi; otherwise histograms of the first 4 coordinates, sampled
    against exact (when the target has an exact sampler)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = x.detach().double().cpu()
    lo, hi = target.plot_range()
    if target.dim == 2:
        fig = Figure(figsize=(4.5, 4.2), layout="constrained")
        ax = fig.subplots()
        g = torch.linspace(lo, hi, 200, dtype=torch.float64)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        lp = target.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(xx.shape)
        ax.contourf(xx.numpy(), yy.numpy(), lp.clamp_min(lp.max() - 30).numpy(), levels=30, cmap="Blues")
        ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, c="crimson", alpha=0.5, label="samples")
        ax.set_xlim(lo, hi), ax.set_ylim(lo, hi), ax.legend(fontsize=7, loc="upper right")
    else:
        k = min(4, target.dim)
        fig = Figure(figsize=(3 * k, 2.8), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, k))
        for i, ax in enumerate(axes):
            bins = np.linspace(lo, hi, 60)
            if exact is not None:
                ax.hist(exact[:, i].double().numpy(), bins=bins, density=True, alpha=0.5, label="exact")
            ax.hist(x[:, i].numpy(), bins=bins, density=True, alpha=0.5, label="sampler")
            ax.set_title(f"x{i}", fontsize=8)
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{target.name}: {title}", fontsize=9)
    fig.savefig(path, dpi=110)
    return path

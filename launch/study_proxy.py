"""Small-scale proxies (issue 14): does the best learning rate of a narrow model carry over to a wide one?

From a study's records (launch/study.py) with an `optim.lr` axis and a `model.fno.width` axis, `write_lr_transfer`
draws `lr_transfer.png`: final train loss (top row) and test relative L2 (bottom row) against the learning rate, one
curve per width (median over repeats), each curve's best learning rate starred, one column per value of the
`model.fno.parametrization` axis ("standard", "mup": trainer/models/fno.py) when the study has one. Under a
parametrization that transfers, the stars line up vertically. Any other axis that varies joins the curve's label.
configs/studies/fno_mup.toml is such a study.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

LR, WIDTH, PARAM = "optim.lr", "model.fno.width", "model.fno.parametrization"
METRICS = (("train_loss", "final train loss"), ("test_rel_l2", "test relative L2"))

# column (parametrization) -> curve (width, other axes) -> lr -> metric -> median over repeats
Curves = dict[str, dict[tuple, dict[float, dict[str, float]]]]


def _setting(record: dict, key: str):
    """A config key's value in a record: its `settings` (every key a cell sets, bundled axes expanded), else `axes`."""
    return record.get("settings", {}).get(key, record.get("axes", {}).get(key))


def lr_curves(records: list[dict]) -> Curves:
    """The records' metrics by column (parametrization), curve (width and any other axis that varies) and learning
    rate: the median over repeats of each metric's finite values (a diverged repeat's NaN is left out; a point where
    every repeat diverged has no value). Failed records and records without a width and a learning rate are skipped."""
    ok = [r for r in records if r.get("status") == "ok" and None not in (_setting(r, LR), _setting(r, WIDTH))]
    values: dict[str, set] = defaultdict(set)
    for r in ok:
        for k, v in r.get("axes", {}).items():
            values[k].add(str(v))
    others = sorted(k for k, vs in values.items() if k not in (LR, WIDTH, PARAM) and len(vs) > 1)
    samples: dict = defaultdict(lambda: defaultdict(list))
    for r in ok:
        curve = (int(_setting(r, WIDTH)), *(f"{k}={r['axes'].get(k)}" for k in others))
        key = (str(_setting(r, PARAM) or "all cells"), curve, float(_setting(r, LR)))
        for metric, _ in METRICS:
            x = r.get(metric)
            if isinstance(x, (int, float)) and math.isfinite(x):
                samples[key][metric].append(float(x))
    curves: Curves = defaultdict(lambda: defaultdict(dict))
    for (column, curve, lr), by_metric in samples.items():
        curves[column][curve][lr] = {m: statistics.median(xs) for m, xs in by_metric.items()}
    return curves


def best_lr(points: dict[float, dict[str, float]], metric: str) -> tuple[float, float] | None:
    """(learning rate, value) of the lowest median `metric` on one curve, or None when no point has it."""
    have = [(v[metric], lr) for lr, v in points.items() if metric in v]
    return None if not have else min(have)[::-1]


def _columns(curves: Curves) -> list[str]:
    """Parametrizations left to right: "standard" first, the baseline."""
    return sorted(curves, key=lambda c: (c != "standard", c))


def _label(curve: tuple) -> str:
    return ", ".join([f"width {curve[0]}", *curve[1:]])


def lr_transfer_figure(curves: Curves, path: Path) -> None:
    from matplotlib.figure import Figure
    columns = _columns(curves)
    fig = Figure(figsize=(5.5 * len(columns), 7.5))
    axes = fig.subplots(len(METRICS), len(columns), squeeze=False, sharex=True)
    labels = sorted({c for col in curves.values() for c in col})   # one colour per curve in every column
    for j, column in enumerate(columns):
        for row, (metric, title) in enumerate(METRICS):
            ax = axes[row][j]
            for curve, points in sorted(curves[column].items()):
                color = f"C{labels.index(curve) % 10}"
                lrs = sorted(lr for lr, v in points.items() if metric in v)
                ax.plot(lrs, [points[lr][metric] for lr in lrs], "o-", color=color, ms=4, label=_label(curve))
                best = best_lr(points, metric)
                if best is not None:
                    ax.plot(*best, "*", color=color, ms=16, mec="k", mew=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_title(title if column == "all cells" else f"{column}: {title}", fontsize=10)
            if row == len(METRICS) - 1:
                ax.set_xlabel("learning rate (optim.lr)")
            if j == 0:
                ax.set_ylabel(title)
        axes[0][j].legend(fontsize=7)
    fig.suptitle("loss against learning rate per width (median over repeats; * = best learning rate)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _fmt(best: tuple[float, float] | None) -> str:
    return "-" if best is None else f"{best[0]:.3g} ({best[1]:.4g})"


def lr_transfer_markdown(curves: Curves, figure: str = "lr_transfer.png") -> str:
    """A report section: the figure, a table of each width's best learning rate per parametrization (by final train
    loss and by test relative L2, the median value in brackets), and how far the best LR moves across widths."""
    columns = _columns(curves)
    curve_keys = sorted({c for col in curves.values() for c in col})
    head = [f"{c}: best lr ({t})" for c in columns for _, t in METRICS]
    lines = ["## Learning rate across widths", "", f"![loss against learning rate per width]({figure})", "",
             "Best learning rate per width: the lowest median over repeats (that median in brackets).", "",
             "| curve | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for curve in curve_keys:
        cells = [_fmt(best_lr(curves[c].get(curve, {}), m)) for c in columns for m, _ in METRICS]
        lines.append(f"| {_label(curve)} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in columns:
        for metric, title in METRICS:
            bests = [b[0] for b in (best_lr(p, metric) for p in curves[c].values()) if b is not None]
            if len(bests) > 1:
                lines.append(f"- {c}, by {title}: best learning rate {min(bests):.3g} to {max(bests):.3g} across "
                             f"the curves (x{max(bests) / min(bests):.3g}; x1: the same at every width, to the grid)")
    return "\n".join(lines) + "\n"


def write_lr_transfer(out_dir: Path, records: list[dict]) -> tuple[Path, str] | None:
    """Write `out_dir/lr_transfer.png` when the records have an `optim.lr` axis (at least two values) and a
    `model.fno.width` axis; returns (the figure's path, a markdown section for report.md: the figure, the table of
    best learning rates per width and parametrization, the spread of the best LR across widths), else None."""
    curves = lr_curves(records)
    if len({lr for col in curves.values() for pts in col.values() for lr in pts}) < 2:
        return None
    path = Path(out_dir) / "lr_transfer.png"
    lr_transfer_figure(curves, path)
    return path, lr_transfer_markdown(curves, path.name)

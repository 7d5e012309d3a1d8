"""Figures and report.md of a study directory (launch/study.py): what a reader looks at before the table.

- scaling.png: step time (median over repeats, p10-p90 bars) and samples/s against the world size, one line per
  combination of the other axes; below them the weak-scaling efficiency t(W_min) / t(W) (data.batch_size is per rank,
  so a world of W does W times the work of one rank per step: 1.0 is perfect).
- error_vs_bytes.png: final test error against gradient bytes per step (per rank), one point per cell.
- memory.png: peak memory per rank against the world size.
- prediction.png: the fitted cost model (launch/study_model.py) dashed beside the measured step times, to 1024 ranks.
- bandwidth.png (studies with a bandwidth axis): step time against the link's bandwidth at the largest world, measured
  (points) and predicted (lines), and where each compressor starts to pay: the bandwidth below which it beats fp32.
- lr_transfer.png (studies with optim.lr and model.fno.width axes): loss against learning rate per width, per
  parametrization (launch/study_proxy.py).
- report.md: the figures, one table row per cell (medians over its repeats) and the cost model's fit.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from launch.study_model import PLACEMENT, is_floor, parse_rate, series_label

WORLD = "world_size"


def _series(records: list[dict], drop: tuple[str, ...] = (WORLD, "nodes")) -> dict[str, dict[int, list[dict]]]:
    """label (the axes other than `drop`) -> world size -> that cell's ok records."""
    out: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("status") != "ok":
            continue
        label = ", ".join(f"{k}={v}" for k, v in r["axes"].items() if k not in drop) or "all"
        out[label][int(r[WORLD])].append(r)
    return out


def _median(rs: list[dict], key: str) -> float | None:
    xs = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def scaling_figure(records: list[dict], path: Path) -> None:
    """One row of three panels per link bandwidth (one row without a bandwidth axis); a series keeps its colour."""
    from matplotlib.figure import Figure
    links = sorted({r.get("bandwidth") for r in records if r.get("status") == "ok"},
                   key=lambda b: (b is not None, parse_rate(b) if b else 0))
    colours = {s: f"C{i % 10}" for i, s in enumerate(sorted({series_label(r) for r in records
                                                              if r.get("status") == "ok"}))}
    fig = Figure(figsize=(13, 0.6 + 3.6 * len(links) + 0.17 * len(colours) / 2), layout="constrained")
    axes = fig.subplots(len(links), 3, squeeze=False)
    for row, link in zip(axes, links):
        ax_t, ax_s, ax_e = row
        for label, by_world in sorted(_series([r for r in records if r.get("bandwidth") == link],
                                              drop=(WORLD, "nodes", "bandwidth")).items()):
            colour = colours.get(label)
            worlds = sorted(by_world)
            med = [_median(by_world[w], "step_s_median") for w in worlds]
            lo = [m - (_median(by_world[w], "step_s_p10") or m) for w, m in zip(worlds, med)]
            hi = [(_median(by_world[w], "step_s_p90") or m) - m for w, m in zip(worlds, med)]
            ax_t.errorbar(worlds, med, yerr=[lo, hi], marker="o", capsize=3, label=label, color=colour)
            ax_s.plot(worlds, [_median(by_world[w], "samples_per_s") for w in worlds], marker="o", color=colour)
            ax_e.plot(worlds, _efficiency(by_world, worlds, med), marker="o", color=colour)
            floor = _floor_efficiency(by_world)
            if floor:
                ax_e.plot(*zip(*floor), "--", marker="x", color=colour)
        at = f" at {link}" if link else ""
        for ax, title in ((ax_t, f"step time (s), median and p10-p90{at}"), (ax_s, f"samples / s{at}"),
                          (ax_e, f"{_EFFICIENCY[_scaling(records)]}{at};\n"
                                 "dashed: t_floor(W) / t(W), same placement")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("world size (ranks)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        ax_e.axhline(1.0, color="k", lw=0.5)
    handles = {}
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=3, fontsize=7)
    fig.savefig(path, dpi=100)


_EFFICIENCY = {"weak": "weak-scaling efficiency t(W min) / t(W)",
               "strong": "strong-scaling efficiency W min t(W min) / (W t(W))"}


def _scaling(records: list[dict]) -> str:
    return "strong" if any(r.get("scaling") == "strong" for r in records) else "weak"


def _efficiency(by_world: dict[int, list[dict]], worlds: list[int], med: list[float]) -> list[float]:
    """Weak scaling (a fixed batch per rank): t(W0) / t(W); strong (a fixed global batch): the speed-up over W0 per
    rank added, W0 t(W0) / (W t(W)). 1.0 is perfect either way."""
    if _scaling([r for w in worlds for r in by_world[w]]) == "strong":
        return [worlds[0] * med[0] / (w * m) for w, m in zip(worlds, med)]
    return [med[0] / m for m in med]


def _floor_efficiency(by_world: dict[int, list[dict]]) -> list[tuple[int, float]]:
    """(W, t_floor / t) where the cell's skip floor was measured (exposed_s): efficiency with the cores' sharing out."""
    out = []
    for w in sorted(by_world):
        t, exposed = _median(by_world[w], "step_s_median"), _median(by_world[w], "exposed_s")
        if t and exposed is not None:
            out.append((w, (t - exposed) / t))
    return out


def weak_scaling_table(records: list[dict]) -> list[str]:
    """report.md's weak-scaling rows: per series, t(W min) / t(W) and t_floor(W) / t(W) at each world size."""
    rows = []
    for label, by_world in sorted(_series(records).items()):
        worlds = sorted(by_world)
        if len(worlds) < 2:
            continue
        eff = _efficiency(by_world, worlds, [_median(by_world[w], "step_s_median") for w in worlds])
        floor = dict(_floor_efficiency(by_world))
        cells = [f"W={w}: {e:.2f}" + (f" ({floor[w]:.2f})" if w in floor else "") for w, e in zip(worlds[1:], eff[1:])]
        rows.append(f"| {label} | {'; '.join(cells)} |")
    if not rows:
        return []
    kind = _scaling(records)
    what = ("t(W min) / t(W), each rank's batch fixed" if kind == "weak"
            else "W min t(W min) / (W t(W)), the global batch fixed (study.global_batch)")
    return ["", f"## {kind.capitalize()} scaling", "", f"{what}; in brackets t_floor(W) / t(W), the "
            "efficiency against the skip floor at the same placement (the ranks here share this machine's cores, so "
            "the first falls with W even when nothing waits on the link).", "", "| series | efficiency |", "|---|---|",
            *rows]


def _one_axes(size: tuple[float, float] = (6, 4)):
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, legend_size: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=100)


def error_bytes_figure(records: list[dict], path: Path) -> None:
    fig, ax = _one_axes()
    for label, by_world in sorted(_series(records).items()):
        for w, rs in sorted(by_world.items()):
            b, e = _median(rs, "bytes_per_step"), _median(rs, "test_rel_l2")
            if b is not None and e is not None:
                ax.scatter([max(b, 1)], [e], label=f"{label}, W={w}")
    ax.set_xscale("log")
    _save(fig, ax, path, "gradient bytes sent per step per rank (W = 1: none)", "final test relative L2", 6)


def memory_figure(records: list[dict], path: Path) -> None:
    fig, ax = _one_axes()
    for label, by_world in sorted(_series(records).items()):
        worlds = sorted(by_world)
        ax.plot(worlds, [_median(by_world[w], "peak_memory_mb_per_rank") for w in worlds], marker="o", label=label)
    ax.set_xscale("log", base=2)
    _save(fig, ax, path, "world size (ranks)", "peak memory per rank (MiB: params, grads, optimizer)", 7)


def _links(records: list[dict]) -> list[str | None]:
    return sorted({r.get("bandwidth") for r in records if r.get("status") == "ok" and (r.get("nodes") or 1) > 1},
                  key=lambda b: (b is not None, 0 if b is None else parse_rate(b)))


def prediction_figure(records: list[dict], model, path: Path, bandwidths: tuple[str, ...] = ("100gbit",)) -> None:
    """Measured step times (points, per link) and the fitted cost model (dashed: the study's links; dotted:
    `bandwidths`) from one rank to 1024, per series."""
    from matplotlib.figure import Figure
    fig, ax = _one_axes((10, 5))
    worlds = [2**i for i in range(11)]
    links = _links(records) or [None]
    rpn = {series_label(r): r.get("ranks_per_node") or 1 for r in records if r.get("status") == "ok"}
    for i, label in enumerate(sorted(model.ops)):
        color = f"C{i % 10}"
        for j, bw in enumerate(links):
            pts = [(int(r[WORLD]), r["step_s_median"]) for r in records if r.get("status") == "ok"
                   and series_label(r) == label and (r.get("bandwidth") == bw or (r.get("nodes") or 1) == 1)]
            if pts:
                ax.plot(*zip(*sorted(pts)), "os^vD"[j % 5], color=color, label=f"{label}" + (f" @ {bw}" if bw else ""))
            bps = parse_rate(bw) if bw else None
            ax.plot(worlds, [model.predict(label, w, bps, ranks_per_node=rpn.get(label, 1)) for w in worlds], "--",
                    color=color, lw=1)
        for bw in bandwidths:
            ax.plot(worlds, [model.predict(label, w, parse_rate(bw), ranks_per_node=rpn.get(label, 1))
                             for w in worlds], ":", color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world size (ranks)")
    ax.set_ylabel("step time (s)")
    ax.set_title(f"measured (points); predicted with each rank on cores of its own, at the study's links (dashed) "
                 f"and {', '.join(bandwidths)} (dotted)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=100)


def _fp32_twins(records: list[dict]) -> dict[str, str]:
    """series -> the series that trains the same thing the same way but exchanges in fp32 (comm.compressor = "none",
    no other exchange setting), for the compressed series that have one."""
    from launch.study_model import is_exchange_key
    settings = {series_label(r): r.get("settings", r["axes"]) for r in records if r.get("status") == "ok"}

    def rest(st):
        return tuple(sorted((k, str(v)) for k, v in st.items() if not is_exchange_key(k) and k not in PLACEMENT))
    fp32 = {rest(st): s for s, st in settings.items()
            if st.get("comm.compressor", "none") == "none" and not any(is_exchange_key(k) and k != "comm.compressor"
                                                                        for k in st)}
    return {s: fp32[rest(st)] for s, st in settings.items()
            if st.get("comm.compressor", "none") not in ("none", "skip") and rest(st) in fp32}


def bandwidth_figure(records: list[dict], model, path: Path) -> list[tuple[str, float | None]]:
    """Step time against bandwidth at the largest world with shaped links: measured (points), predicted (lines);
    returns (series, bandwidth in bps below which it beats its fp32 twin, or None) for every compressed series."""
    from matplotlib.figure import Figure

    from launch.study_model import crossover_bps
    shaped = [r for r in records if r.get("status") == "ok" and r.get("bandwidth") and (r.get("nodes") or 1) > 1]
    if not shaped:
        return []
    w = max(int(r[WORLD]) for r in shaped)
    twins = _fp32_twins(records)
    fig, ax = _one_axes((9.5, 4.5))
    grid = [10 ** (6 + k / 8) for k in range(49)]
    pays = []
    floors = {series_label(r) for r in shaped if is_floor(r)}      # their compute is what the others are placed on
    for i, label in enumerate(sorted(set(model.ops) - floors)):
        color = f"C{i % 10}"
        rs = [r for r in shaped if series_label(r) == label and int(r[WORLD]) == w]
        rpn = rs[0].get("ranks_per_node", 1) if rs else 1
        if rs:
            ax.plot([parse_rate(r["bandwidth"]) for r in rs], [r["step_s_median"] for r in rs], "o", color=color)
        placed = model.placed.get((label, w))      # the compute with this machine's cores shared, as the points
        ax.plot(grid, [model.predict(label, w, b, placed, rpn) for b in grid], "-", color=color, lw=1, label=label)
        twin = twins.get(label)
        if twin is not None and twin != label and twin in model.ops:
            pays.append((label, crossover_bps(model, label, twin, w, rpn)))   # each rank on its own cores
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link bandwidth between nodes (bit/s)")
    ax.set_ylabel(f"step time at {w} ranks (s)")
    ax.set_title("measured (points) and predicted (lines): a compressor pays where its line is below fp32's",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=100)
    return pays


def _replicas(ok: list[dict]) -> str:
    consistent = {r.get("replicas_consistent") for r in ok}
    if is_floor(ok[0]):
        return "no exchange"          # a skip floor's replicas drift apart by design
    return "identical" if consistent == {True} else "n/a" if consistent == {None} else "DIFFER"


def _pays(bps: float | None) -> str:
    if bps is None:
        return "never"
    return "every link to 1 Tbit/s" if bps == float("inf") else f"{bps / 1e9:.3g} Gbit/s"


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def write_report(out: Path, records: list[dict], title: str) -> None:
    """The three figures and report.md in the study directory `out`."""
    scaling_figure(records, out / "scaling.png")
    error_bytes_figure(records, out / "error_vs_bytes.png")
    memory_figure(records, out / "memory.png")
    cells: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        cells[r["cell"]].append(r)
    lines = [f"# Study {title}", "", "![scaling](scaling.png)", "", "![error against bytes](error_vs_bytes.png)",
             "![memory per rank](memory.png)", "",
             "| cell | repeats ok | step s (median) | p10-p90 | samples/s | exchange s | exposed s | MB/step | "
             "peak MiB/rank | test L2 | replicas |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, rs in cells.items():
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok:
            lines.append(f"| {key} | 0 of {len(rs)} | failed: {rs[-1]['error'][:80]} | | | | | | | | |")
            continue
        b = _median(ok, "bytes_per_step")
        lines.append(
            f"| {key} | {len(ok)} of {len(rs)} | {_fmt(_median(ok, 'step_s_median'), '.4f')} | "
            f"{_fmt(_median(ok, 'step_s_p10'), '.4f')}-{_fmt(_median(ok, 'step_s_p90'), '.4f')} | "
            f"{_fmt(_median(ok, 'samples_per_s'), '.1f')} | {_fmt(_median(ok, 'exchange_s'), '.4f')} | "
            f"{_fmt(_median(ok, 'exposed_s'), '.4f')} | "
            f"{_fmt(None if b is None else b / 1e6, '.3f')} | {_fmt(_median(ok, 'peak_memory_mb_per_rank'), '.1f')} | "
            f"{_fmt(_median(ok, 'test_rel_l2'), '.4f')} | "
            f"{_replicas(ok)} |")
    lines += weak_scaling_table(records)
    from launch.study_model import fit
    try:
        model = fit(records)
    except ValueError as e:
        lines += ["", f"No cost model: {e}."]
    else:
        prediction_figure(records, model, out / "prediction.png")
        lines += ["", "## Cost model", "", "t = compute + sum over each engine's and compressor's collectives of "
                  f"(alpha messages + beta(link) bytes) (launch/study_model.py): {model.describe()}. "
                  "`fieldtrain study predict DIR --nodes 512 --bandwidth 100gbit` prints its predictions.", "",
                  *(f"Caveat: {c}." for c in model.caveats), "", "![prediction](prediction.png)"]
        pays = bandwidth_figure(records, model, out / "bandwidth.png")
        if pays:
            lines += ["", "## Where compression pays", "", "![bandwidth](bandwidth.png)", "",
                      "| series | predicted faster than fp32 below |", "|---|---|"]
            lines += [f"| {s} | {_pays(b)} |" for s, b in pays]
    from launch.study_proxy import write_lr_transfer
    lr_transfer = write_lr_transfer(out, records)   # (path, markdown); None without optim.lr and model.fno.width axes
    if lr_transfer is not None:
        lines += ["", lr_transfer[1]]
    env = records[0] if records else {}
    links = sorted({r.get("link", "?") for r in records})
    lines += ["", f"{env.get('cores', '?')} cores on this machine, shared by every cell's ranks (cores per rank in "
              f"results.csv); links: {'; '.join(links)}. exposed s: step time less the same cell's with "
              "comm.compressor = \"skip\" (no exchange), where the study ran one."]
    (out / "report.md").write_text("\n".join(lines) + "\n")

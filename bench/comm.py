"""Benchmark compressed gradient exchange on emulated slow links (needs root; see bench/README.md).

For each bandwidth: build W network namespaces (launch/netns.py), then run every row (a compressor plus
options) as W `fieldtrain train` ranks at once, one per namespace, after a `skip` row (no exchange: the
compute-only floor). Rows are compared with the floor and with fp32 (`none`) at the same bandwidth.
`--codec-only` times the compressors' local encode+decode against memcpy, no namespaces needed.

    sudo .venv/bin/python bench/comm.py --quick
    sudo .venv/bin/python bench/comm.py --nodes 4 --bandwidths 1gbit,100mbit --compressors none,fp16
    sudo .venv/bin/python bench/comm.py --engine fsdp2 --bandwidths 1gbit,100mbit     # the sharded path
    sudo .venv/bin/python bench/comm.py --engine deepspeed --zero-stage 3 --quick
    .venv/bin/python bench/comm.py --codec-only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # `python bench/comm.py` from anywhere

from launch import netns
from launch.netns import Outcome
from bench.codec import run_codec
from bench.table import _fmt, print_table

CONFIG = ROOT / "configs" / "darcy_fno.toml"
DATA = ROOT / "bench" / "results" / "data" / "darcy-n512-res64.zarr"
# The benchmark's model: FNO-2D, width 32, 12 modes, 64x64 grid, batch 16 per rank, Adam (from the config).
MODEL = ["model.fno.width=32", "model.fno.modes=[12,12]", "model.fno.padding=0", "data.batch_size=16"]
WARMUP_STEPS = 5                 # left out of the median step time
FLOOR = "skip"
FP32 = "none"
DEFAULT_ROWS = ["none", "fp16", "torch_fp16", "torch_powersgd:rank=1,real", "torch_powersgd:rank=4,real",
                "torch_powersgd:rank=4", "powersgd:rank=1", "powersgd:rank=4", "topk:density=0.01",
                "randk:density=0.01", "int8", "int4", "sign", "auto"]
QUICK = {"nodes": 4, "bandwidths": "100mbit", "steps": 30, "eval_every": 5, "best": "powersgd:rank=4"}
QUICK_SHARDED = {"best": "int4"}   # --quick's compressed row on the reduce-scatter path
HARMLESS = "hostname of the client socket cannot be retrieved"


# ---- rows ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One benchmark row: `spec` as given ("torch_powersgd:rank=1,real") and the `--set`s it means."""
    spec: str
    compressor: str
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        """Filesystem-safe label, e.g. torch_powersgd-rank-1-real."""
        return re.sub(r"[^A-Za-z0-9_.]+", "-", self.spec).strip("-")


def parse_row(spec: str) -> Row:
    """NAME[:OPT,...]; OPT is key=value (the compressor's own table, comm.NAME.key, unless it has a section, e.g.
    optim.lr=1e-3),
    or `real`/`complex` for model.fno.spectral_weights."""
    name, _, opts = spec.strip().partition(":")
    if not name:
        raise ValueError(f"row {spec!r}: expected NAME[:key=value,...], e.g. powersgd:rank=4")
    sets = [f"comm.compressor={name}"]
    for opt in filter(None, (o.strip() for o in opts.split(","))):
        if opt in ("real", "complex"):
            sets.append(f"model.fno.spectral_weights={opt}")
        elif "=" in opt:
            key, value = opt.split("=", 1)
            table = {"torch_powersgd": "powersgd"}.get(name, name)   # a bare key is the compressor's own setting
            sets.append(f"{key if '.' in key else f'comm.{table}.{key}'}={value}")
        else:
            raise ValueError(f"row {spec!r}: option {opt!r} is neither key=value nor real/complex")
    return Row(spec.strip(), name, tuple(sets))


ENGINE: list[str] = []           # --engine/--zero-stage as overrides, added to every row


def check_rows(rows: list[Row]) -> None:
    """Validate every row against the trainer's config (unknown compressor or key, or one the engine cannot carry ->
    ValueError)."""
    from trainer.config import load_config
    names = [r.name for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"rows given twice: {', '.join(dup)} (the `skip` floor row is always run)")
    for row in rows:
        try:
            load_config(CONFIG, [*MODEL, *ENGINE, *row.overrides])
        except ValueError as e:
            raise ValueError(f"row {row.spec!r}: {e}") from None


def choose_rows(args: argparse.Namespace) -> list[Row]:
    from trainer.parallel import ENGINES
    carried = ENGINES[args.engine].compressors   # DDP: every registered compressor; sharded engines: fewer
    if args.quick:
        best = args.best or (QUICK["best"] if args.engine == "ddp" else QUICK_SHARDED["best"])
        specs = [FP32, "torch_powersgd:rank=4,real", best] if args.engine == "ddp" else [FP32, best]
    elif args.compressors:
        specs = _split_specs(args.compressors)
    else:   # the default list, less what this engine cannot carry
        specs = [s for s in DEFAULT_ROWS if s.partition(":")[0] in carried]
        left_out = [s for s in DEFAULT_ROWS if s not in specs]
        if left_out:
            print(f"note: not carried by parallel.engine={args.engine}, left out: {', '.join(left_out)}")
    rows = [parse_row(s) for s in specs]
    if FP32 not in [r.spec for r in rows]:
        rows.insert(0, parse_row(FP32))   # the reference for time-to-accuracy and overhead removed
    rows.insert(0, parse_row(FLOOR))
    check_rows(rows)
    return rows


def _split_specs(text: str) -> list[str]:
    """Rows are separated by spaces or by commas that start a new NAME (options also use commas):
    "none,fp16,torch_powersgd:rank=1,real" -> none / fp16 / torch_powersgd:rank=1,real."""
    specs: list[str] = []
    for part in re.split(r"[\s]+", text.strip()):
        for piece in filter(None, part.split(",")):
            is_option = ":" not in piece and ("=" in piece or piece in ("real", "complex"))
            if specs and is_option and ":" in specs[-1]:
                specs[-1] += "," + piece
            elif specs and is_option and ":" not in specs[-1]:
                raise ValueError(f"--compressors: option {piece!r} follows {specs[-1]!r}, which has no ':'; "
                                 f"write e.g. {specs[-1]}:{piece}")
            else:
                specs.append(piece)
    if not specs:
        raise ValueError("--compressors is empty")
    return specs


# ---- one row: W ranks in W namespaces ----------------------------------------------------------------------
def rank_command(topo: netns.Topology, i: int, row: Row, run_root: Path, port: int, steps: int,
                 eval_every: int, per_node: int = 1) -> list[str]:
    """Rank i runs in namespace i // per_node: ranks of one namespace reach each other inside it (unshaped, the
    fast link of a node), other namespaces through the shaped veth (the slow link between nodes)."""
    env = netns.rank_env(topo, i, per_node, port) | {"OMP_NUM_THREADS": "1"}
    sets = [*MODEL, f"data.path={DATA}", f"run.out_dir={run_root}", f"run.name={row.name}",
            f"train.max_steps={steps}", "train.log_every=1", f"train.eval_every={eval_every}",
            "train.progress=false", "run.threads_per_rank=1", *ENGINE, *row.overrides]
    argv = [sys.executable, "-m", "launch.cli", "train", str(CONFIG), "--overwrite"]   # a rerun replaces the row
    for s in sets:
        argv += ["--set", s]
    return topo.exec_command(i // per_node, argv, env)


def run_row(topo: netns.Topology, row: Row, run_root: Path, port: int, steps: int, eval_every: int,
            timeout_s: float, per_node: int = 1) -> Outcome:
    """Start all ranks of `row`, wait for them (at most `timeout_s`), and kill whatever is left."""
    run_dir = run_root / row.name
    run_dir.mkdir(parents=True, exist_ok=True)
    world = topo.nodes * per_node
    cmds = [rank_command(topo, i, row, run_root, port, steps, eval_every, per_node) for i in range(world)]
    outcome = netns.run_ranks(topo, cmds, [run_dir / f"rank{i}.log" for i in range(world)], timeout_s, cwd=ROOT,
                              per_node=per_node, skip=HARMLESS)
    if outcome.status == "ok" and not (run_dir / "summary.json").exists():
        return Outcome("failed", f"no summary.json:\n{netns._tail(run_dir / 'rank0.log', skip=HARMLESS)}",
                       outcome.wall_s)
    return outcome


# ---- results ----------------------------------------------------------------------------------------------
def read_metrics(path: Path, column: str = "step_time_s") -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """metrics.csv -> ([(step, column)] train rows, [(step, test_rel_l2)] eval rows)."""
    train, evals = [], []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            if r.get("test_rel_l2"):
                evals.append((int(r["step"]), float(r["test_rel_l2"])))
            elif r.get("step_time_s") and r.get(column):
                train.append((int(r["step"]), float(r[column])))
    return train, evals


def median_step_time(train: list[tuple[int, float]], skip: int = WARMUP_STEPS) -> float | None:
    times = [t for step, t in train if step > skip]
    return statistics.median(times) if times else None


def time_to_target(train: list[tuple[int, float]], evals: list[tuple[int, float]], target: float) -> float | None:
    """Cumulative step time up to the first eval at or below `target` (evaluation time excluded); None if never.

    Step 1 also waits for the slowest rank to finish starting up (seconds, and random), so it counts at
    the median step time instead.
    """
    times = dict(train)
    if 1 in times and (median := median_step_time(train)) is not None:
        times[1] = median
    for step, l2 in sorted(evals):
        if l2 <= target:
            return sum(t for s, t in times.items() if s <= step)
    return None


def summarize(row: Row, outcome: Outcome, run_dir: Path, bandwidth: str, nodes: int) -> dict:
    """One JSON record for `row` (the comparisons with floor/fp32 are added by `compare`)."""
    rec = {"row": row.spec, "compressor": row.compressor, "options": list(row.overrides[1:]),
           "engine": " ".join(ENGINE) or "parallel.engine=ddp", "bandwidth": bandwidth, "nodes": nodes, "status": outcome.status, "error": outcome.error,
           "row_wall_s": round(outcome.wall_s, 1), "run_dir": str(run_dir)}
    if outcome.status != "ok":
        return rec
    summary = json.loads((run_dir / "summary.json").read_text())
    train, evals = read_metrics(run_dir / "metrics.csv")
    rec.update(median_step_s=median_step_time(train), steps=summary.get("steps"),
               exchange_s=median_step_time(read_metrics(run_dir / "metrics.csv", "exchange_s")[0]),
               bytes_per_step=summary.get("grad_bytes_per_step"),
               compression_ratio=summary.get("compression_ratio"),
               test_rel_l2=summary.get("test_rel_l2"), replica_max_abs_diff=summary.get("replica_max_abs_diff"),
               peak_memory_mb=(summary.get("peak_memory_bytes") or {}).get("total", 0) / 2**20 or None,
               train_wall_s=summary.get("wall_time_s"), _train=train, _evals=evals)
    return rec


def compare(records: list[dict]) -> None:
    """Add floor, ratio to floor, time to fp32's final test L2 and overhead removed (one bandwidth's records)."""
    def pick(spec):
        return next((r for r in records if r["row"] == spec and r["status"] == "ok"), None)
    floor, fp32 = pick(FLOOR), pick(FP32)
    t_floor = floor and floor["median_step_s"]
    t_fp32 = fp32 and fp32["median_step_s"]
    for r in records:
        train, evals = r.pop("_train", None), r.pop("_evals", None)
        if r["status"] != "ok":
            continue
        t = r["median_step_s"]
        r["floor_step_s"] = t_floor
        r["ratio_to_floor"] = t / t_floor if t and t_floor else None
        r["exposed_s"] = t - t_floor if t and t_floor else None   # the exchange time not hidden behind compute
        if fp32 and fp32["test_rel_l2"] is not None and evals is not None:
            reached = time_to_target(train, evals, fp32["test_rel_l2"])
            r["time_to_fp32_l2_s"] = reached if reached is not None else "never"
        gap = (t_fp32 - t_floor) if t_fp32 and t_floor else None
        r["overhead_removed"] = (t_fp32 - t) / gap if gap and t and gap > 0 else None


COLUMNS = ["row", "engine", "bandwidth", "nodes", "ranks_per_node", "repeat", "status", "median_step_s", "floor_step_s", "ratio_to_floor",
           "exchange_s", "exposed_s",
           "bytes_per_step", "compression_ratio", "peak_memory_mb", "test_rel_l2", "replica_max_abs_diff", "time_to_fp32_l2_s",
           "overhead_removed", "steps", "row_wall_s", "options", "error", "run_dir"]


def write_results(out: Path, stem: str, records: list[dict], columns: list[str]) -> None:
    """Append to <stem>.jsonl and rewrite <stem>.csv with every record so far."""
    with (out / f"{stem}.jsonl").open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    every = [json.loads(line) for line in (out / f"{stem}.jsonl").read_text().splitlines()]
    with (out / f"{stem}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in every:
            w.writerow({k: (" ".join(v) if isinstance(v, list) else v) for k, v in r.items()})


def _nodes(r: dict) -> str:
    per = r.get("ranks_per_node", 1)
    return str(r["nodes"]) if per == 1 else f"{r['nodes']}x{per}"


def print_comm_table(records: list[dict]) -> None:
    headers = ["row", "bw", "W", "step s", "spread", "floor s", "x floor", "exch s", "exposed s", "MB/step", "compr", "mem MiB",
               "test L2",
               "replica diff", "t->fp32 L2", "overhead rm"]
    lines, failures = [], []
    for r in records:
        if r.get("median_step_s") is None:   # failed (every repeat, when repeated)
            lines.append([r["row"], r["bandwidth"], _nodes(r), r["status"].upper()] + ["-"] * (len(headers) - 4))
            failures.append(f"{r['row']} @ {r['bandwidth']}: {(r['error'].splitlines() or [''])[-1]}")
            continue
        floor = r["row"] == FLOOR
        t2 = r.get("time_to_fp32_l2_s")
        lines.append([
            r["row"] + (" (floor)" if floor else ""), r["bandwidth"], _nodes(r),
            _fmt(r["median_step_s"], ".3f"), _fmt(r.get("step_spread")), _fmt(r.get("floor_step_s"), ".3f"),
            _fmt(r.get("ratio_to_floor"), ".2f") + ("x" if r.get("ratio_to_floor") else ""),
            "-" if floor else _fmt(r.get("exchange_s"), ".3f"), "-" if floor else _fmt(r.get("exposed_s"), ".3f"),
            "-" if floor else _fmt(r["bytes_per_step"] / 1e6, ".3f"),
            "-" if floor else _fmt(r["compression_ratio"], ".1f"), _fmt(r.get("peak_memory_mb"), ".1f"),
            _fmt(r["test_rel_l2"], ".4f"), _fmt(r["replica_max_abs_diff"], ".1e"),
            "-" if floor else (t2 if isinstance(t2, str) else _fmt(t2, ".1f") + (" s" if t2 is not None else "")),
            "-" if floor else (_fmt(100 * r["overhead_removed"], ".0f") + "%" if r.get("overhead_removed") is not None
                               else "-"),
        ])
    print_table(headers, lines)
    for f in failures:
        print(f"  {f}  (log tail in the JSON 'error' field)")


# ---- data -------------------------------------------------------------------------------------------------
def ensure_data() -> None:
    """Generate the benchmark's Darcy store once (512 samples, 64x64) and reuse it afterwards."""
    if DATA.exists():
        return
    tmp = DATA.with_name(DATA.name + ".tmp")
    print(f"generating {DATA} (once) ...", flush=True)
    cmd = [sys.executable, "-m", "launch.cli", "data", "generate", "darcy", "--n", "512", "--res", "64",
           "--param", "fine_factor=2", "--chunk-size", "32", "--task-cpus", "1", "--overwrite", "--out", str(tmp)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"data generation failed:\n{proc.stderr[-2000:]}")
    tmp.rename(DATA)


# ---- main -------------------------------------------------------------------------------------------------
def run_network(args: argparse.Namespace, rows: list[Row], bandwidths: list[tuple[str, int | None]],
                out: Path) -> list[dict]:
    everything = []
    timeout = args.row_timeout or 120 + 10 * args.steps
    for label, rate in bandwidths:
        topo = netns.Topology(args.nodes, rate)
        per_node = args.ranks_per_node
        run_root = out / "runs" / (f"{label}-{args.nodes}n" + (f"x{per_node}" if per_node > 1 else ""))
        print(f"\n== {label}, {args.nodes} nodes x {per_node} rank(s): {len(rows)} rows x {args.steps} steps "
              f"(namespaces {topo.prefix}-*) ==", flush=True)
        with netns.Network(topo):
            for rep in range(args.repeats):   # every row once per pass: repeats interleave, drift hits all rows
                records = []
                root = run_root / f"repeat{rep}" if args.repeats > 1 else run_root
                for j, row in enumerate(rows):
                    print(f"  {row.spec}{f' (repeat {rep + 1}/{args.repeats})' if args.repeats > 1 else ''} ...",
                          end=" ", flush=True)
                    outcome = run_row(topo, row, root, 29500 + j, args.steps, args.eval_every, timeout, per_node)
                    records.append({**summarize(row, outcome, root / row.name, label, args.nodes),
                                    "ranks_per_node": per_node, "repeat": rep})
                    print(f"{outcome.status} ({outcome.wall_s:.0f} s)", flush=True)
                compare(records)
                write_results(out, "results", records, COLUMNS)
                everything += records
    return everything


MEDIANS = ("median_step_s", "floor_step_s", "ratio_to_floor", "exchange_s", "exposed_s", "overhead_removed",
           "test_rel_l2", "bytes_per_step", "compression_ratio", "peak_memory_mb", "replica_max_abs_diff")


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (bandwidth, row) over its repeats: the median of each measure, the step time's min-max spread,
    time-to-fp32 as the median of the repeats that got there. A single repeat passes through unchanged."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["bandwidth"], r["row"]), []).append(r)
    if all(len(g) == 1 for g in groups.values()):
        return records
    out = []
    for group in groups.values():
        ok = [r for r in group if r["status"] == "ok"]
        agg = {**(ok or group)[0], "repeats": len(group),
               "status": "ok" if len(ok) == len(group) else f"{len(ok)}/{len(group)} ok"}
        for key in MEDIANS:
            values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            agg[key] = statistics.median(values) if values else None
        steps = [r["median_step_s"] for r in ok if r.get("median_step_s")]
        agg["step_spread"] = f"{min(steps):.3f}-{max(steps):.3f}" if steps else None
        reached = [r["time_to_fp32_l2_s"] for r in ok if isinstance(r.get("time_to_fp32_l2_s"), (int, float))]
        agg["time_to_fp32_l2_s"] = statistics.median(reached) if len(reached) * 2 > len(ok) else "never"
        out.append(agg)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--nodes", type=int, default=None, help="namespaces (emulated nodes), 2..8 (default 4)")
    p.add_argument("--ranks-per-node", type=int, default=1, help="ranks in each namespace, joined unshaped inside "
                                                                 "it (a row option comm.hierarchy=node uses that)")
    p.add_argument("--bandwidths", default=None, help="comma-separated tc rates or 'unshaped' "
                                                      "(default 10gbit,1gbit,100mbit)")
    p.add_argument("--compressors", default=None,
                   help="rows: NAME[:key=value,...,real|complex], e.g. 'none,fp16,torch_powersgd:rank=1,real' "
                        "(default: every registered compressor); fp32 'none' is always added")
    p.add_argument("--steps", type=int, default=None, help="training steps per row (default 100)")
    p.add_argument("--repeats", type=int, default=1, help="passes over all rows, interleaved; the table gives "
                                                          "medians and the spread (the issue's targets: >= 3)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between test evaluations (default 10)")
    p.add_argument("--row-timeout", type=float, default=0, help="seconds before a row's ranks are killed "
                                                                "(default 120 + 10 * steps)")
    p.add_argument("--engine", default="ddp", help="parallel.engine: ddp (allreduce path), fsdp2 or deepspeed "
                                                   "(reduce-scatter path); default ddp")
    p.add_argument("--zero-stage", type=int, default=None, help="parallel.zero_stage with --engine deepspeed "
                                                                "(default 3)")
    p.add_argument("--quick", action="store_true", help="100mbit, 4 nodes: floor, fp32, torch PowerSGD r4, --best")
    p.add_argument("--best", default=None, help="--quick's row for our compressor (default powersgd:rank=4)")
    p.add_argument("--codec-only", action="store_true", help="only the local encode/decode timing (no root)")
    p.add_argument("--out", default=None, help="results folder (default bench/results/comm-<timestamp>)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    q = args.quick
    args.nodes = args.nodes or (QUICK["nodes"] if q else 4)
    args.steps = args.steps or (QUICK["steps"] if q else 100)
    args.eval_every = args.eval_every or (QUICK["eval_every"] if q else 10)
    bandwidth_text = args.bandwidths or (QUICK["bandwidths"] if q else "10gbit,1gbit,100mbit")
    out = Path(args.out or ROOT / "bench" / "results" / f"comm-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        if args.best and not q:
            raise ValueError("--best only applies to --quick")
        if args.quick and args.codec_only:
            raise ValueError("--quick and --codec-only exclude each other")
        from trainer.parallel import ENGINES
        if args.engine not in ENGINES:
            raise ValueError(f"--engine {args.engine!r}; allowed: {', '.join(ENGINES)}")
        if args.zero_stage is not None and args.engine != "deepspeed":
            raise ValueError("--zero-stage only applies to --engine deepspeed")
        ENGINE[:] = [f"parallel.engine={args.engine}"] + (
            [f"parallel.zero_stage={args.zero_stage or 3}"] if args.engine == "deepspeed" else [])
        if not 2 <= args.nodes <= netns.MAX_NODES:
            raise ValueError(f"--nodes {args.nodes}: must be in 2..{netns.MAX_NODES}")
        if args.repeats < 1:
            raise ValueError(f"--repeats {args.repeats}: must be >= 1")
        if args.ranks_per_node < 1:
            raise ValueError(f"--ranks-per-node {args.ranks_per_node}: must be >= 1")
        if args.steps <= WARMUP_STEPS:
            raise ValueError(f"--steps {args.steps}: must exceed the {WARMUP_STEPS} warm-up steps")
        if args.eval_every < 1:
            raise ValueError(f"--eval-every {args.eval_every}: must be >= 1")
        bandwidths = [(b.strip(), netns.parse_rate(b)) for b in bandwidth_text.split(",") if b.strip()]
        rows = [] if args.codec_only else choose_rows(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.codec_only:
        try:
            netns.check_available()
        except netns.NetnsUnavailable as e:
            print(f"error: {e}\n(`--codec-only` needs neither)", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    (out / "meta.json").write_text(json.dumps({**vars(args), "rows": [r.spec for r in rows], "cpus": os.cpu_count(),
                                               "load_avg_1min_at_start": load,
                                               "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    if load > 0.5:   # timings are only comparable on an otherwise idle machine
        print(f"note: load average {load:.1f} at start; other work on this machine skews the timings")
    netns.exit_on_signals()
    t0 = time.perf_counter()
    try:
        if not args.codec_only:
            ensure_data()
            records = aggregate(run_network(args, rows, bandwidths, out))
            (out / "summary.json").write_text(json.dumps(records, indent=2))
            print()
            print_comm_table(records)
            if args.repeats > 1:
                print(f"medians of {args.repeats} interleaved repeats; spread: min-max of their median step times")
            print(f"{args.nodes * args.ranks_per_node} ranks ({args.ranks_per_node} per namespace, 1 thread each) "
                  f"shared {os.cpu_count()} cores; "
                  f"{' '.join(ENGINE)}")
        if not args.quick:
            print()
            run_codec(out)
    except (KeyboardInterrupt, SystemExit) as e:
        print(f"\ninterrupted; namespaces removed, partial results in {out}", file=sys.stderr)
        return e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
    print(f"\nresults in {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    from launch.cli import reexec_with_hugepage_malloc
    reexec_with_hugepage_malloc()            # the codec rows run here; the ranks are `fieldtrain` commands anyway
    sys.exit(main())

"""`fieldtrain study STUDY.toml`: a scaling study, one training run per cell of a grid of config values.

A study file names the base run config and the axes; every combination of axis values is a cell, run `repeats`
times for `steps` steps each:

    [study]
    config = "configs/darcy_fno.toml"          # relative to the study file
    steps = 20
    repeats = 2
    warmup_steps = 5                          # left out of the step-time statistics
    set = ["model.fno.width=32", "data.batch_size=16"]   # common to every cell
    # global_batch = 64                       # strong scaling: data.batch_size = 64 / W (default: weak, per rank)

    [axes]
    world_size = [1, 2, 4]                    # ranks in all (not a config key)
    "parallel.engine" = ["ddp", "fsdp2"]
    "comm.compressor" = ["none", "powersgd"]
    # nodes = [1, 2, 4]                       # emulated nodes, world_size / nodes ranks each (not a config key)
    # bandwidth = ["100mbit", "1gbit"]        # the link between nodes (local backend: tc tbf; not a config key)
    # exchange = [{name = "fp32", "comm.compressor" = "none"},           # a bundle: keys that vary together,
    #             {name = "int8 ZeRO-2", "parallel.engine" = "deepspeed", "parallel.zero_stage" = 2,
    #              "comm.compressor" = "int8"}]                            # labelled by its name

Every cell's config is built and checked before anything runs (an unknown key, a value the config rejects, a world
the backend cannot place: an error naming the cell). The study directory keeps `study.json` (the study file's
content and its fingerprint: a directory of another study is refused unless `--force`), one run directory per cell
and repeat under `cells/`, and `results.jsonl` (one line per finished cell and repeat, appended as each ends: `--resume`
skips what is there), `results.csv`, the figures and report.md (launch/study_report.py). A failed cell is recorded
with its error, and the study goes on.

Backends: "local" runs each cell's ranks on this machine: a one-node cell over loopback (`fieldtrain train --nproc W`),
a cell of N > 1 nodes on N emulated nodes (launch/netns.py: one network namespace per node, joined through a bridge
whose ports tc's tbf shapes to the cell's `bandwidth`; ranks of one node talk inside its namespace, unshaped; root
needed, checked before anything runs). A one-node cell has no link: it runs once and its record stands for every
bandwidth ("shared_from" names the cell that ran). "slurm" submits each cell as a job through the project's Slurm
launcher (launch/slurm.py: slurm/cpu.sbatch, `nodes` nodes of W / nodes tasks) and waits for it, one at a time (cells
compared side by side should not share the nodes). "ray" runs each cell as a Ray Train job (`fieldtrain launch ray`,
W workers) on the cluster at --ray-address, one at a time (launch/study_ray.py).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fieldtrain")

WORLD = "world_size"
NODES = "nodes"
BANDWIDTH = "bandwidth"
PLACEMENT = (WORLD, NODES, BANDWIDTH)       # axes that place the ranks; every other axis is a config key
STUDY_KEYS = {"config", "steps", "repeats", "warmup_steps", "set", "name", "out_dir", "eval_every", "global_batch"}
BACKENDS = ("local", "slurm", "ray")
SLURM_TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                  "DEADLINE", "PREEMPTED")
SLURM_TIMEOUT_S = 24 * 3600.0   # a cell's job is given up (cancelled, recorded failed) after this long
RANKS_PER_CORE = 4            # the local backend oversubscribes at most this far (1 thread per rank)
COLUMNS = ["cell", "repeat", "status", "error", WORLD, NODES, "ranks_per_node", BANDWIDTH, "axes", "steps",
           "step_s_median", "step_s_p10", "step_s_p90", "samples_per_s", "exchange_s", "exposed_s", "bytes_per_step",
           "compression_ratio", "peak_memory_mb_per_rank",
           "train_loss", "test_rel_l2", "replicas_consistent", "replica_max_abs_diff", "cores", "cores_per_rank",
           "link", "wall_s", "run_dir", "shared_from"]


@dataclass(frozen=True)
class Cell:
    """One combination of axis values: (key, value) pairs in axis order (the world size among them)."""
    values: tuple[tuple[str, object], ...]

    @property
    def world(self) -> int:
        v = dict(self.values)
        return int(v.get(WORLD, v.get(NODES, 1)))

    @property
    def nodes(self) -> int:
        return int(dict(self.values).get(NODES, 1))

    @property
    def bandwidth(self) -> str | None:
        return dict(self.values).get(BANDWIDTH)

    @property
    def runs_as(self) -> str:
        """The key of the run this cell's record comes from: one node has no link, so its bandwidth is not part."""
        return ",".join(f"{k}={_toml_value(_shown(v))}" for k, v in self.values
                        if not (k == BANDWIDTH and self.nodes == 1))

    @property
    def settings(self) -> dict:
        """The config keys this cell sets (bundles expanded)."""
        out = {}
        for k, v in self.values:
            if isinstance(v, dict):
                out.update({bk: bv for bk, bv in v.items() if bk != "name"})
            elif k not in PLACEMENT:
                out[k] = v
        return out

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={_toml_value(v)}" for k, v in self.settings.items()]

    @property
    def key(self) -> str:
        """A readable identity, e.g. `world_size=2,comm.compressor=powersgd`."""
        return ",".join(f"{k}={_toml_value(_shown(v))}" for k, v in self.values)

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.key.replace(",", "__"))[:180] or "cell"


@dataclass
class Study:
    path: Path
    config: Path
    steps: int
    repeats: int
    warmup_steps: int
    sets: list[str]
    axes: dict[str, list]
    name: str
    out: Path
    eval_every: int
    text: str = field(repr=False, default="")
    global_batch: int = 0              # > 0: strong scaling, data.batch_size = global_batch / W in every cell

    @property
    def scaling(self) -> str:
        return "strong" if self.global_batch else "weak"

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def cells(self) -> list[Cell]:
        keys = list(self.axes)
        return [Cell(tuple(zip(keys, combo))) for combo in itertools.product(*(self.axes[k] for k in keys))]

    def overrides(self, cell: Cell, run_dir: Path) -> list[str]:
        batch = [f"data.batch_size={self.global_batch // cell.world}"] if self.global_batch else []
        return [*self.sets, *cell.overrides, *batch, f"train.max_steps={self.steps}",
                f"train.eval_every={self.eval_every}", "train.progress=false", f"run.out_dir={run_dir.parent}",
                f"run.name={run_dir.name}"]


def _shown(v):
    """An axis value as labels show it: a bundle by its name."""
    return v["name"] if isinstance(v, dict) else v


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)           # a TOML basic string
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError(f"axis value {v!r}: numbers, strings, booleans or lists of them")


def load_study(path: str | Path, out: str | Path | None = None) -> Study:
    """Parse and check a study file (errors name the file and the key)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"study file {str(path)!r} is not valid TOML: {e}") from None
    unknown = set(raw) - {"study", "axes"}
    if unknown:
        raise ValueError(f"study file {str(path)!r}: unknown table(s) {sorted(unknown)}; allowed: [study], [axes]")
    head, axes = raw.get("study", {}), raw.get("axes", {})
    bad = set(head) - STUDY_KEYS
    if bad:
        raise ValueError(f"study file {str(path)!r}: unknown key(s) {sorted(f'study.{k}' for k in bad)}; "
                         f"allowed: {', '.join(sorted(STUDY_KEYS))}")
    if "config" not in head:
        raise ValueError(f"study file {str(path)!r}: study.config (the base run config) is required")
    if not axes or not all(isinstance(v, list) and v for v in axes.values()):
        raise ValueError(f"study file {str(path)!r}: [axes] needs at least one key, each a non-empty list of values")
    for key, vals in axes.items():
        for v in vals:
            if isinstance(v, dict) and (not isinstance(v.get("name"), str) or len(v) < 2
                                        or any(isinstance(x, dict) for x in v.values()) or set(v) & set(PLACEMENT)):
                raise ValueError(f"study file {str(path)!r}: axes.{key}: a bundle {v!r} needs a name and config keys "
                                 f"(not {', '.join(PLACEMENT)}): {{name = \"fp32\", \"comm.compressor\" = \"none\"}}")
    for key in ("steps", "repeats", "global_batch"):
        if not isinstance(head.get(key, 1), int) or head.get(key, 1) < 1:
            raise ValueError(f"study file {str(path)!r}: study.{key} = {head[key]!r}; must be an integer >= 1")
    for key in (WORLD, NODES):
        if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in axes.get(key, [1])):
            raise ValueError(f"study file {str(path)!r}: axes.{key} = {axes[key]!r}; must be integers >= 1")
    from launch.study_model import parse_rate
    for bw in axes.get(BANDWIDTH, []):
        try:
            parse_rate(str(bw))
        except ValueError as e:
            raise ValueError(f"study file {str(path)!r}: axes.{BANDWIDTH}: {e}") from None
    config = Path(head["config"])
    config = config if config.is_absolute() else (path.parent / config)
    if not config.is_file():
        config = Path(head["config"])  # relative to the working directory, as `fieldtrain train` takes it
    if not config.is_file():
        raise ValueError(f"study file {str(path)!r}: study.config = {head['config']!r} is neither beside the study "
                         "file nor under the working directory")
    config = config.resolve()
    name = head.get("name") or path.stem
    steps = head.get("steps", 20)
    return Study(path=path, config=config, steps=steps, repeats=head.get("repeats", 1),
                 warmup_steps=int(head.get("warmup_steps", min(5, steps // 2))), sets=list(head.get("set", [])),
                 axes=dict(axes), name=name, out=Path(out or head.get("out_dir") or Path("runs") / "studies" / name),
                 eval_every=int(head.get("eval_every", steps)), text=text, global_batch=head.get("global_batch", 0))


def _capacity(backend: str, ray_address: str | None = None) -> tuple[int | None, str]:
    """The most ranks one cell (local, ray) or one node of a cell (slurm) can have on `backend`, and why. local:
    RANKS_PER_CORE per core of this machine; slurm: the CPUs of the cluster's largest node (one rank per CPU), None
    when sinfo cannot say; ray: the cluster's CPUs over the per-worker share (launch/study_ray.py)."""
    if backend == "ray":
        from launch.study_ray import ray_capacity
        return ray_capacity(ray_address)
    if backend == "local":
        cores = len(os.sched_getaffinity(0))
        return RANKS_PER_CORE * cores, f"{RANKS_PER_CORE} per core on this machine's {cores}"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, ""
    cpus = [int(c) for c in out.stdout.split() if c.isdigit()] if out.returncode == 0 else []
    return (max(cpus), "one node per cell, one rank per CPU of the largest node") if cpus else (None, "")


def check_cells(study: Study, backend: str, ray_address: str | None = None) -> list[Cell]:
    """Every cell's config, built as its run will build it; ValueError naming the first cell that fails."""
    from trainer.config import load_config
    if backend not in BACKENDS:
        raise ValueError(f"study backend {backend!r}: built are {', '.join(BACKENDS)}")
    if backend == "ray" and not ray_address:
        raise ValueError("study backend ray: --ray-address HOST:PORT (the cluster's head) is required")
    capacity, where = _capacity(backend, ray_address)
    if backend == "ray" and capacity is None:
        raise ValueError(f"study backend ray: {where}")
    cells = study.cells()
    from launch import netns
    for cell in cells:
        per_node = cell.world // cell.nodes
        if cell.world % cell.nodes:
            raise ValueError(f"study cell {cell.key}: {cell.world} ranks do not split evenly over {cell.nodes} nodes")
        if study.global_batch % cell.world:
            raise ValueError(f"study cell {cell.key}: study.global_batch = {study.global_batch} does not split evenly "
                             f"over {cell.world} ranks (strong scaling keeps the global batch)")
        if study.global_batch and any(o.startswith("data.batch_size=") for o in cell.overrides):
            raise ValueError(f"study cell {cell.key}: study.global_batch sets data.batch_size per cell; drop it from "
                             "the axes")
        if backend == "ray" and cell.nodes > 1:
            raise ValueError(f"study cell {cell.key}: axes.{NODES}: Ray Train places a job's workers itself (drop the "
                             f"axis; world_size sets the workers)")
        if capacity is not None and (per_node if backend == "slurm" else cell.world) > capacity:
            raise ValueError(f"study cell {cell.key}: {cell.world} ranks"
                             + (f" ({per_node} per node)" if cell.nodes > 1 else "")
                             + f"; the {backend} backend places at most {capacity} ({where})")
        if backend != "local" and BANDWIDTH in study.axes:
            raise ValueError(f"study cell {cell.key}: axes.{BANDWIDTH} is the local backend's emulated link; on "
                             f"{backend} the cluster's own links are measured (drop the axis)")
        if backend == "local" and cell.nodes > 1:
            if cell.nodes > netns.MAX_NODES:
                raise ValueError(f"study cell {cell.key}: {cell.nodes} emulated nodes; at most {netns.MAX_NODES}")
            try:
                netns.check_available()
            except netns.NetnsUnavailable as e:
                raise ValueError(f"study cell {cell.key}: {cell.nodes} emulated nodes need network namespaces: "
                                 f"{e}") from None
        try:
            load_config(study.config, study.overrides(cell, study.out / "cells" / "x"))
        except ValueError as e:
            raise ValueError(f"study cell {cell.key}: {e}") from None
    return cells


def _steps(metrics: Path, column: str, warmup: int) -> list[float]:
    with metrics.open(newline="") as f:
        return [float(r[column]) for r in csv.DictReader(f)
                if r.get(column) and r.get("step_time_s") and int(r["step"]) > warmup]


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def cell_record(study: Study, cell: Cell, repeat: int, run_dir: Path, status: str, error: str, wall: float) -> dict:
    """One results row: what the issue's scaling studies compare, from the run's summary.json and metrics.csv."""
    cores = len(os.sched_getaffinity(0))
    link = (f"{cell.bandwidth or 'unshaped'} between {cell.nodes} emulated nodes (tbf)" if cell.nodes > 1
            else "loopback (one node)")
    rec = {"cell": cell.key, "repeat": repeat, "status": status, "error": error, "scaling": study.scaling,
           WORLD: cell.world,
           NODES: cell.nodes, "ranks_per_node": cell.world // cell.nodes, BANDWIDTH: cell.bandwidth,
           "axes": {k: _shown(v) for k, v in cell.values}, "settings": cell.settings, "cores": cores,
           "cores_per_rank": round(cores / cell.world, 3),
           "link": link, "wall_s": round(wall, 2), "run_dir": str(run_dir)}
    if status != "ok":
        return rec
    summary = json.loads((run_dir / "summary.json").read_text())
    times = _steps(run_dir / "metrics.csv", "step_time_s", study.warmup_steps)
    exchange = _steps(run_dir / "metrics.csv", "exchange_s", study.warmup_steps)
    from trainer.config import load_config
    batch = load_config(study.config, study.overrides(cell, run_dir)).data.batch_size
    rec.update(_collectives(study, cell, run_dir, summary))
    median = statistics.median(times) if times else None
    diff = summary.get("replica_max_abs_diff")
    rec.update(steps=summary.get("steps"), step_s_median=median, step_s_p10=_quantile(times, 0.1),
               step_s_p90=_quantile(times, 0.9), samples_per_s=batch * cell.world / median if median else None,
               exchange_s=statistics.median(exchange) if exchange else None,
               bytes_per_step=summary.get("grad_bytes_per_step"), compression_ratio=summary.get("compression_ratio"),
               peak_memory_mb_per_rank=(summary.get("peak_memory_bytes") or {}).get("total", 0) / 2**20 or None,
               train_loss=summary.get("train_loss"), test_rel_l2=summary.get("test_rel_l2"),
               replica_max_abs_diff=diff, replicas_consistent=None if diff is None else diff == 0.0)
    return rec


def _collectives(study: Study, cell: Cell, run_dir: Path, summary: dict) -> dict:
    """The cost model's view of a cell (launch/study_model.py): its step's collectives with their payloads, and whether
    they span the nodes (comm.hierarchy = "node") rather than the ranks; {} where its compressor has no cost model."""
    from launch.study_model import step_collectives
    from trainer.config import load_config
    cfg = load_config(study.config, study.overrides(cell, run_dir))
    hierarchical = cfg.comm.hierarchy == "node" and cell.nodes > 1
    span = cell.nodes if hierarchical else cell.world
    shapes = [(tuple(s), c) for s, c in summary.get("param_shapes", [])]
    at = {}
    try:
        for w in sorted({span, *(2**k for k in range(1, 13))}):     # a shard's payload depends on W: predictions
            grads, params = step_collectives(cfg, shapes, w)        # take them at the span they predict
            at[w] = [list(op) for op in grads + params]
    except ValueError as e:              # a compressor without a cost model (auto): the cell is not in the fit
        log.info("study cell %s: no collectives for the cost model (%s)", cell.key, e)
        return {}
    return {"collectives": at[span], "collectives_at": {str(w): ops for w, ops in at.items()},
            "hierarchical": hierarchical}


def _cell_paths(study: Study, cell: Cell, repeat: int) -> tuple[Path, Path]:
    """(run directory, log) of a cell and repeat; a leftover run directory (a cell not recorded: its run failed or
    the study started over) is removed, so nothing of it is resumed or read."""
    run_dir = (study.out / "cells" / f"{cell.dirname}__r{repeat}").resolve()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return run_dir, run_dir.parent / f"{run_dir.name}.log"


def _outcome(study: Study, cell: Cell, repeat: int, run_dir: Path, log_path: Path, ended: bool, why: str,
             wall: float) -> dict:
    """The record of a run that `ended` well (and wrote its summary), or a failed one with `why` and its log's tail."""
    if ended and (run_dir / "summary.json").is_file():
        return cell_record(study, cell, repeat, run_dir, "ok", "", wall)
    tail = log_path.read_text().strip().splitlines()[-5:] if log_path.is_file() else []
    return cell_record(study, cell, repeat, run_dir, "failed", f"{why}: " + " | ".join(tail)[-600:], wall)


def run_cell(study: Study, cell: Cell, repeat: int) -> dict:
    """Train one cell on this machine (`fieldtrain train --nproc W` over loopback, its ranks' threads by the local
    launcher's rule; on emulated nodes when it has more than one); its record."""
    if cell.nodes > 1:
        return run_cell_netns(study, cell, repeat)
    run_dir, log_path = _cell_paths(study, cell, repeat)
    argv = [sys.executable, "-m", "launch.cli", "train", str(study.config), "--nproc", str(cell.world)]
    argv += [a for s in study.overrides(cell, run_dir) for a in ("--set", s)]
    t0 = time.perf_counter()
    with log_path.open("w") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
    return _outcome(study, cell, repeat, run_dir, log_path, rc == 0, f"exit {rc}", time.perf_counter() - t0)


def run_cell_netns(study: Study, cell: Cell, repeat: int, port: int = 29500) -> dict:
    """Train one cell on `cell.nodes` emulated nodes (fresh namespaces, shaped to its bandwidth, deleted after): rank i
    in node i // (W / nodes), every rank a `fieldtrain train` process with torchrun's variables; its record."""
    from launch import netns
    from launch.run import default_threads
    from launch.study_model import parse_rate
    run_dir, log_path = _cell_paths(study, cell, repeat)
    run_dir.mkdir(parents=True)
    per_node = cell.world // cell.nodes
    rate = parse_rate(cell.bandwidth) if cell.bandwidth else None
    threads = default_threads(cell.world, {})    # every rank shares this machine's cores
    argv = [sys.executable, "-m", "launch.cli", "train", str(study.config)]
    argv += [a for s in study.overrides(cell, run_dir) for a in ("--set", s)]
    logs = [run_dir / f"rank{i}.log" for i in range(cell.world)]
    t0 = time.perf_counter()
    with netns.Network(netns.Topology(cell.nodes, rate)) as topo:
        cmds = [topo.exec_command(i // per_node, argv, netns.rank_env(topo, i, per_node, port)
                                  | {"OMP_NUM_THREADS": str(threads)}) for i in range(cell.world)]
        outcome = netns.run_ranks(topo, cmds, logs, timeout_s=600 + 30 * study.steps, cwd=Path.cwd(),
                                  per_node=per_node)
    log_path.write_text("\n".join(log.read_text(errors="replace") for log in logs if log.is_file()))
    return _outcome(study, cell, repeat, run_dir, log_path, outcome.status == "ok", outcome.status,
                    time.perf_counter() - t0)


def run_cell_slurm(study: Study, cell: Cell, repeat: int, poll_s: float = 2.0) -> dict:
    """Train one cell as a Slurm job (`launch.slurm`: slurm/cpu.sbatch, one node, W tasks), wait for it to end; its
    record. Where the cluster keeps no accounting, a job gone from `scontrol` has ended: its summary.json decides."""
    from launch.slurm import SlurmJob, launch_slurm
    run_dir, log_path = _cell_paths(study, cell, repeat)
    job = SlurmJob(config=str(study.config), nodes=cell.nodes, tasks_per_node=cell.world // cell.nodes,
                   job_name=f"study-{study.name}",
                   output=str(log_path), overrides=["run.threads_per_rank=1", *study.overrides(cell, run_dir)])
    t0 = time.perf_counter()
    job_id = launch_slurm(job)
    state = "PENDING"
    while time.perf_counter() - t0 < SLURM_TIMEOUT_S:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
        info = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
        state = info.get("JobState", "GONE")
        if state in SLURM_TERMINAL or state == "GONE":
            break
        time.sleep(poll_s)
    else:
        subprocess.run(["scancel", job_id], check=False)
        state = "TIMEOUT (study)"
    rec = _outcome(study, cell, repeat, run_dir, log_path, state in ("COMPLETED", "GONE"),
                   f"slurm job {job_id} {state}", time.perf_counter() - t0)
    return rec | {"link": "slurm", "slurm_job": job_id}


def with_exposed(records: list[dict]) -> list[dict]:
    """Each ok record with `exposed_s`: its median step time less that of the cell with comm.compressor = "skip" (no
    exchange: the compute floor) at the same placement with the same settings but the exchange's (comm.*, DDP's bucket
    cap), where the study has one; else None."""
    from launch.study_model import floor_key, is_floor
    floors = {(r["repeat"], floor_key(r)): r["step_s_median"] for r in records
              if r.get("status") == "ok" and is_floor(r) and r.get("step_s_median")}
    out = []
    for r in records:
        ok = r.get("status") == "ok" and r.get("step_s_median")
        floor = floors.get((r["repeat"], floor_key(r))) if ok else None
        out.append({**r, "exposed_s": None if floor is None else r["step_s_median"] - floor})
    return out


def read_records(path: Path) -> list[dict]:
    """A study's results.jsonl (empty when there is none yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_csv(out: Path, records: list[dict]) -> None:
    tmp = out / "results.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, "axes": json.dumps(r.get("axes", {}))})
    tmp.replace(out / "results.csv")


def _claim(study: Study, resume: bool, force: bool) -> None:
    """The study directory: new, this study's (with --resume or --force), or another's (refused unless --force)."""
    meta = study.out / "study.json"
    if meta.is_file():
        theirs = json.loads(meta.read_text()).get("fingerprint")
        if theirs != study.fingerprint and not force:
            raise ValueError(f"study directory {str(study.out)!r} holds another study (fingerprint {theirs}, this "
                             f"file's {study.fingerprint}); --force to start it over")
        if theirs == study.fingerprint and not (resume or force):
            raise ValueError(f"study directory {str(study.out)!r} exists: --resume to run what is missing, --force "
                             "to start over")
        if force and not resume:
            for name in ("results.jsonl", "results.csv"):
                (study.out / name).unlink(missing_ok=True)
    study.out.mkdir(parents=True, exist_ok=True)
    tmp = study.out / "study.json.tmp"
    tmp.write_text(json.dumps({"fingerprint": study.fingerprint, "name": study.name, "file": str(study.path),
                               "text": study.text,
                               "config": str(study.config)}, indent=1))
    tmp.replace(meta)


def run_study(path: str | Path, backend: str = "local", resume: bool = False, force: bool = False,
              out: str | Path | None = None, ray_address: str | None = None) -> list[dict]:
    """Run every cell x repeat not recorded yet; returns all records (results.jsonl, results.csv written)."""
    study = load_study(path, out)
    cells = check_cells(study, backend, ray_address)
    _claim(study, resume, force)
    if backend == "local" and any(c.nodes > 1 for c in cells):
        from launch.netns import exit_on_signals
        exit_on_signals()          # SIGTERM/SIGHUP/Ctrl-C stop the ranks and delete the namespaces on the way out
    results = study.out / "results.jsonl"
    ran = {(r["cell"], r["repeat"]): r for r in read_records(results)}
    todo = [(c, r) for r in range(study.repeats) for c in cells if (c.key, r) not in ran]
    log.info("study %s: %d cells x %d repeats, %d to run (%s backend) -> %s", study.name, len(cells), study.repeats,
             len(todo), backend, study.out)
    by_key = {c.key: c for c in cells}
    for i, (cell, repeat) in enumerate(todo, 1):
        source = next((r for (k, rep), r in ran.items() if rep == repeat and r["status"] == "ok"
                       and k in by_key and by_key[k].runs_as == cell.runs_as), None)
        if source is not None:            # a one-node cell already run at another bandwidth
            rec = {**source, "cell": cell.key, "axes": {k: _shown(v) for k, v in cell.values},
                   BANDWIDTH: cell.bandwidth, "shared_from": source["cell"]}
        elif backend == "ray":
            from launch.study_ray import run_cell_ray
            rec = run_cell_ray(study, cell, repeat, ray_address)
        else:
            rec = (run_cell_slurm if backend == "slurm" else run_cell)(study, cell, repeat)
        ran[(cell.key, repeat)] = rec
        with results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("[%d/%d] %s repeat %d: %s%s", i, len(todo), cell.key, repeat, rec["status"],
                 f", {rec['step_s_median']:.3f} s/step" if rec.get("step_s_median") else f" ({rec['error'][:200]})")
    return _write_outputs(study.out, study.name)


def _write_outputs(out: Path, name: str) -> list[dict]:
    records = with_exposed(read_records(out / "results.jsonl"))
    write_csv(out, records)
    from launch.study_report import write_report
    write_report(out, records, name)
    return records


def rewrite_report(out: str | Path) -> Path:
    """results.csv, the figures and report.md of a study directory again from its results.jsonl (`fieldtrain study
    report DIR`), each record's axes, settings and collectives re-derived from the study file where it still exists
    (a cost model that changed since the study ran, a record of an older version); the report's path."""
    out = Path(out)
    meta = out / "study.json"
    if not meta.is_file() or not (out / "results.jsonl").is_file():
        raise ValueError(f"{str(out)!r} is not a study directory with results (study.json and results.jsonl)")
    info = json.loads(meta.read_text())
    if Path(info["file"]).is_file():      # re-derive what the records take from the study file and today's code
        study = load_study(info["file"], out)
        cells = {c.key: c for c in study.cells()}
        records = read_records(out / "results.jsonl")
        for r in records:
            cell = cells.get(r["cell"])
            summary = Path(r.get("run_dir", "")) / "summary.json"
            if cell is None:
                continue
            r.update(axes={k: _shown(v) for k, v in cell.values}, settings=cell.settings)
            if r["status"] == "ok" and summary.is_file():
                r.update(_collectives(study, cell, Path(r["run_dir"]), json.loads(summary.read_text())))
        tmp = out / "results.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(out / "results.jsonl")
    _write_outputs(out, info.get("name") or Path(info["file"]).stem)
    return out / "report.md"

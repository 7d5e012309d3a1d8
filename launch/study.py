"""`fieldtrain study STUDY.toml`: a scaling study, one training run per cell of a grid of config values.

A study file names the base run config and the axes; every combination of axis values is a cell, run `repeats`
times for `steps` steps each:

    [study]
    config = "configs/darcy_fno.toml"          # relative to the study file
    steps = 20
    repeats = 2
    warmup_steps = 5                          # left out of the step-time statistics
    set = ["model.fno.width=32", "data.batch_size=16"]   # common to every cell

    [axes]
    world_size = [1, 2, 4]                    # ranks (the one axis that is not a config key)
    "parallel.engine" = ["ddp", "fsdp2"]
    "comm.compressor" = ["none", "powersgd"]

Every cell's config is built and checked before anything runs (an unknown key, a value the config rejects, a world
the backend cannot place: an error naming the cell). The study directory keeps `study.json` (the study file's
content and its fingerprint: a directory of another study is refused unless `--force`), one run directory per cell
and repeat under `cells/`, and `results.jsonl` (one line per finished cell and repeat, appended as each ends: `--resume`
skips what is there), `results.csv`, the figures and report.md (launch/study_report.py). A failed cell is recorded
with its error, and the study goes on.

Backends: "local" runs each cell's ranks on this machine over loopback (`fieldtrain train --nproc W`); "slurm" submits
each cell as a job through the project's Slurm launcher (launch/slurm.py: slurm/cpu.sbatch, one node, W tasks) and
waits for it, one at a time (cells compared side by side should not share the nodes).
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
STUDY_KEYS = {"config", "steps", "repeats", "warmup_steps", "set", "name", "out_dir", "eval_every"}
BACKENDS = ("local", "slurm")
SLURM_TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                  "DEADLINE", "PREEMPTED")
SLURM_TIMEOUT_S = 24 * 3600.0   # a cell's job is given up (cancelled, recorded failed) after this long
RANKS_PER_CORE = 4            # the local backend oversubscribes at most this far (1 thread per rank)
COLUMNS = ["cell", "repeat", "status", "error", WORLD, "axes", "steps", "step_s_median", "step_s_p10", "step_s_p90",
           "samples_per_s", "exchange_s", "bytes_per_step", "compression_ratio", "peak_memory_mb_per_rank",
           "train_loss", "test_rel_l2", "replicas_consistent", "replica_max_abs_diff", "cores", "cores_per_rank",
           "link", "wall_s", "run_dir"]


@dataclass(frozen=True)
class Cell:
    """One combination of axis values: (key, value) pairs in axis order (the world size among them)."""
    values: tuple[tuple[str, object], ...]

    @property
    def world(self) -> int:
        return int(dict(self.values).get(WORLD, 1))

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={_toml_value(v)}" for k, v in self.values if k != WORLD]

    @property
    def key(self) -> str:
        """A readable identity, e.g. `world_size=2,comm.compressor=powersgd`."""
        return ",".join(f"{k}={_toml_value(v)}" for k, v in self.values)

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

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def cells(self) -> list[Cell]:
        keys = list(self.axes)
        return [Cell(tuple(zip(keys, combo))) for combo in itertools.product(*(self.axes[k] for k in keys))]

    def overrides(self, cell: Cell, run_dir: Path) -> list[str]:
        return [*self.sets, *cell.overrides, f"train.max_steps={self.steps}", f"train.eval_every={self.eval_every}",
                "train.progress=false", f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}"]


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
    if any(isinstance(v, dict) for vals in axes.values() for v in vals):
        raise ValueError(f"study file {str(path)!r}: axis values are numbers, strings, booleans or lists")
    for key in ("steps", "repeats"):
        if not isinstance(head.get(key, 1), int) or head.get(key, 1) < 1:
            raise ValueError(f"study file {str(path)!r}: study.{key} = {head[key]!r}; must be an integer >= 1")
    if not all(isinstance(w, int) and w >= 1 for w in axes.get(WORLD, [1])):
        raise ValueError(f"study file {str(path)!r}: axes.{WORLD} = {axes[WORLD]!r}; must be integers >= 1")
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
                 eval_every=int(head.get("eval_every", steps)), text=text)


def _capacity(backend: str) -> tuple[int | None, str]:
    """The most ranks one cell can have on `backend`, and why. local: RANKS_PER_CORE per core of this machine;
    slurm: the CPUs of the cluster's largest node (a cell is one node, one rank per CPU), None when sinfo cannot say."""
    if backend == "local":
        cores = len(os.sched_getaffinity(0))
        return RANKS_PER_CORE * cores, f"{RANKS_PER_CORE} per core on this machine's {cores}"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, ""
    cpus = [int(c) for c in out.stdout.split() if c.isdigit()] if out.returncode == 0 else []
    return (max(cpus), "one node per cell, one rank per CPU of the largest node") if cpus else (None, "")


def check_cells(study: Study, backend: str) -> list[Cell]:
    """Every cell's config, built as its run will build it; ValueError naming the first cell that fails."""
    from trainer.config import load_config
    if backend not in BACKENDS:
        raise ValueError(f"study backend {backend!r}: built are {', '.join(BACKENDS)}")
    capacity, where = _capacity(backend)
    cells = study.cells()
    for cell in cells:
        if capacity is not None and cell.world > capacity:
            raise ValueError(f"study cell {cell.key}: {cell.world} ranks; the {backend} backend places at most "
                             f"{capacity} ({where})")
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
    rec = {"cell": cell.key, "repeat": repeat, "status": status, "error": error, WORLD: cell.world,
           "axes": {k: v for k, v in cell.values}, "cores": cores, "cores_per_rank": round(cores / cell.world, 3),
           "link": "loopback", "wall_s": round(wall, 2), "run_dir": str(run_dir)}
    if status != "ok":
        return rec
    summary = json.loads((run_dir / "summary.json").read_text())
    times = _steps(run_dir / "metrics.csv", "step_time_s", study.warmup_steps)
    exchange = _steps(run_dir / "metrics.csv", "exchange_s", study.warmup_steps)
    from trainer.config import load_config
    batch = load_config(study.config, study.overrides(cell, run_dir)).data.batch_size
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
    launcher's rule); its record."""
    run_dir, log_path = _cell_paths(study, cell, repeat)
    argv = [sys.executable, "-m", "launch.cli", "train", str(study.config), "--nproc", str(cell.world)]
    argv += [a for s in study.overrides(cell, run_dir) for a in ("--set", s)]
    t0 = time.perf_counter()
    with log_path.open("w") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode
    return _outcome(study, cell, repeat, run_dir, log_path, rc == 0, f"exit {rc}", time.perf_counter() - t0)


def run_cell_slurm(study: Study, cell: Cell, repeat: int, poll_s: float = 2.0) -> dict:
    """Train one cell as a Slurm job (`launch.slurm`: slurm/cpu.sbatch, one node, W tasks), wait for it to end; its
    record. Where the cluster keeps no accounting, a job gone from `scontrol` has ended: its summary.json decides."""
    from launch.slurm import SlurmJob, launch_slurm
    run_dir, log_path = _cell_paths(study, cell, repeat)
    job = SlurmJob(config=str(study.config), nodes=1, tasks_per_node=cell.world, job_name=f"study-{study.name}",
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
    tmp.write_text(json.dumps({"fingerprint": study.fingerprint, "file": str(study.path), "text": study.text,
                               "config": str(study.config)}, indent=1))
    tmp.replace(meta)


def run_study(path: str | Path, backend: str = "local", resume: bool = False, force: bool = False,
              out: str | Path | None = None) -> list[dict]:
    """Run every cell x repeat not recorded yet; returns all records (results.jsonl, results.csv written)."""
    study = load_study(path, out)
    cells = check_cells(study, backend)
    _claim(study, resume, force)
    results = study.out / "results.jsonl"
    done = {(r["cell"], r["repeat"]) for r in read_records(results)}
    todo = [(c, r) for r in range(study.repeats) for c in cells if (c.key, r) not in done]
    log.info("study %s: %d cells x %d repeats, %d to run (%s backend) -> %s", study.name, len(cells), study.repeats,
             len(todo), backend, study.out)
    for i, (cell, repeat) in enumerate(todo, 1):
        rec = (run_cell_slurm if backend == "slurm" else run_cell)(study, cell, repeat)
        with results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("[%d/%d] %s repeat %d: %s%s", i, len(todo), cell.key, repeat, rec["status"],
                 f", {rec['step_s_median']:.3f} s/step" if rec.get("step_s_median") else f" ({rec['error'][:200]})")
    records = read_records(results)
    write_csv(study.out, records)
    from launch.study_report import write_report
    write_report(study.out, records, study.name)
    return records

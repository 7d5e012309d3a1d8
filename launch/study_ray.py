"""The Ray backend of `fieldtrain study`: each cell and repeat one Ray Train job on an existing cluster.

A cell runs through the project's Ray Train launcher (launch/ray_train.py, the path `fieldtrain launch ray CONFIG
--address ADDR --workers W` takes) in a subprocess of its own, its output to the cell's log: a cell that fails (or
hangs, or takes its driver down) is recorded failed with the log's tail and the study goes on, and each cell's driver
joins the cluster afresh. The job is given W workers of CPUS_PER_WORKER CPUs each (the launcher's default for CPU
workers, passed explicitly so the placement check and the jobs agree), no restarts (a restarted worker group would
mix a second start-up into the step times; a failed cell is a failed record) and its Ray storage inside the cell's
run directory (so a re-run cell, whose run directory `_cell_paths` clears, never restores a checkpoint of an earlier
attempt). Cells run one at a time: cells compared side by side should not share the cluster.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time

from launch.study import Cell, Study, _cell_paths, _outcome

CPUS_PER_WORKER = 0.5        # launch/ray_train.py's default for CPU workers: room for Ray Data's read tasks
RAY_TIMEOUT_S = 24 * 3600.0  # a cell's job is given up (its driver killed, recorded failed) after this long
PROBE_TIMEOUT_S = 120.0      # ray_capacity's look at the cluster
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Run in a subprocess: the study's own process never joins the cluster. Prints the alive nodes' CPU counts.
_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
try:
    print(json.dumps([n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]))
finally:
    ray.shutdown()
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")   # keeps the cell's log readable (its tail is the error)
    return env


def ray_capacity(address: str) -> tuple[int | None, str]:
    """The most workers one cell can have on the Ray cluster at `address`, and why: each alive node's CPUs over the
    per-worker share (CPUS_PER_WORKER), summed (Ray Train places a job's workers across nodes); (None, why) when
    the cluster cannot be reached or does not say."""
    from launch.ray_train import _check_reachable
    try:
        _check_reachable(address)
    except ValueError as e:
        return None, str(e)
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True, env=_env(),
                             timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"the Ray cluster at {address} did not answer ({e})"
    lines = out.stdout.strip().splitlines()
    try:
        cpus = [float(c) for c in json.loads(lines[-1])] if out.returncode == 0 and lines else None
    except (ValueError, TypeError):
        cpus = None
    if not cpus:
        tail = " | ".join(out.stderr.strip().splitlines()[-3:])[-300:]
        return None, f"the Ray cluster at {address} did not say its CPUs ({tail})"
    workers = sum(math.floor(c / CPUS_PER_WORKER + 1e-9) for c in cpus)
    return workers, (f"{CPUS_PER_WORKER:g} CPU per worker on the Ray cluster's {len(cpus)} node(s), "
                     f"{sum(cpus):g} CPUs")


def run_cell_ray(study: Study, cell: Cell, repeat: int, address: str) -> dict:
    """Train one cell as a Ray Train job (`fieldtrain launch ray`, W workers) on the cluster at `address`, in a
    subprocess; its record, with the link "ray" and the cluster's address."""
    run_dir, log_path = _cell_paths(study, cell, repeat)
    argv = [sys.executable, "-m", "launch.cli", "launch", "ray", str(study.config), "--address", address,
            "--workers", str(cell.world), "--cpus-per-worker", str(CPUS_PER_WORKER), "--max-failures", "0",
            "--storage-path", str(run_dir / "ray")]
    argv += [a for s in ["run.threads_per_rank=1", *study.overrides(cell, run_dir)] for a in ("--set", s)]
    t0 = time.perf_counter()
    with log_path.open("w") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), text=True,
                                errors="replace")
        killed = threading.Event()
        watchdog = threading.Timer(RAY_TIMEOUT_S, lambda: (killed.set(), proc.kill()))
        watchdog.start()
        try:
            for line in proc.stdout:       # Ray colours its workers' lines even into a file: the log is read as text
                out.write(ANSI.sub("", line))
                out.flush()
            rc = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:        # the study itself was interrupted: leave no driver behind
                proc.kill()
                proc.wait()
    why = f"ray job killed after {RAY_TIMEOUT_S:.0f} s (study)" if killed.is_set() else f"ray job exit {rc}"
    rec = _outcome(study, cell, repeat, run_dir, log_path, rc == 0, why, time.perf_counter() - t0)
    return rec | {"link": "ray", "ray_address": address}

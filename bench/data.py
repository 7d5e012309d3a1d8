"""Benchmark the data path: how fast each loader delivers samples, and how long a training step waits for them.

Throughput (samples/s) of one epoch over a Darcy 64x64 store, for
  raw     sequential `zarr` read of every chunk of both arrays, one process (the limit),
  direct  the sharded `ShardedLoader` (data.loader = "direct"),
  ray     the Ray Data path `RayShardedLoader` (data.loader = "ray"),
with 1 and 2 ranks (separate processes joined by gloo, as under torchrun), on local disk (the page cache
dropped before every epoch where permitted) and on a loopback S3 endpoint (moto's server), for blosc-lz4 and
zstd. Each measurement runs `--epochs` epochs and reports the last (the first pays Ray's worker start-up).
Then the share of an FNO-2D training step (64x64, batch 16, width 32, 12 modes) spent waiting for data,
from `fieldtrain train` runs with `data_wait_s` logged every step.

    .venv/bin/python bench/data.py                  # everything, ~15 min on 2 cores
    .venv/bin/python bench/data.py --quick          # local lz4 only, 1 and 2 ranks
    .venv/bin/python bench/data.py --skip-train     # throughput only

Results: bench/results/data-<time>/{throughput,step_wait}.{jsonl,csv} and meta.json; a table is printed.
Timings are meaningful on an otherwise idle machine only (meta.json records the load average).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # `python bench/data.py` from anywhere

from bench.comm import DATA, ensure_data, write_results
from bench.table import _fmt, print_table

CONFIG = ROOT / "configs" / "darcy_fno.toml"
MODEL = ["model.fno.width=32", "model.fno.modes=[12,12]", "model.fno.padding=0", "data.batch_size=16"]
BATCH = 16
WARMUP_STEPS = 5
TARGETS = {"direct": 0.9, "ray": 0.5}


# ---- the stores ----------------------------------------------------------------------------------------
def build_arrays(repeat: int):
    """The comm benchmark's 512 Darcy samples, repeated `repeat` times: real fields (so codecs see
    realistic data) in a store big enough to time."""
    import numpy as np

    from data.store import FieldDataset
    ensure_data()
    src = FieldDataset(str(DATA))
    x, y = src.read(0, src.num_samples)
    return np.concatenate([x] * repeat), np.concatenate([y] * repeat), src.attrs


def write_store(url: str, arrays, chunk_size: int, codec: str, storage_options: dict | None) -> None:
    from data.store import write_field_dataset
    x, y, attrs = arrays
    write_field_dataset(url, x, y, chunk_size=chunk_size, generator=attrs.get("generator", "darcy"),
                        params={**attrs.get("params", {}), "repeated_for_benchmark": True},
                        grid_bounds=attrs["grid"]["bounds"], storage_options=storage_options, codec=codec,
                        overwrite=True)


class MotoServer:
    """moto's S3 server in its own process on a loopback port (not a thread: it would share our GIL)."""

    def __init__(self) -> None:
        from launch.local import free_port
        self.port = free_port()
        exe = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": self.endpoint}}
        import s3fs
        fs = s3fs.S3FileSystem(**self.options, skip_instance_cache=True)
        for _ in range(100):
            try:
                fs.mkdir("bench")
                return
            except (OSError, ValueError):  # not listening yet (botocore's errors derive from these)
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not start on {self.endpoint}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ---- one measurement: W rank processes ------------------------------------------------------------------
def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _raw_epoch(ds) -> int:
    """Read every chunk of both arrays in order, decoded to numpy: the rate no loader can beat."""
    n = 0
    for c in range(ds.num_chunks):
        lo, hi = c * ds.chunk_size, min((c + 1) * ds.chunk_size, ds.num_samples)
        ds.inputs[lo:hi], ds.targets[lo:hi]
        n += hi - lo
    return n


def worker(args: argparse.Namespace) -> None:
    """One rank: build the loader, then time `epochs` full epochs (page cache dropped before each)."""
    import torch
    import torch.distributed as dist

    from data.loader import ShardedLoader
    from data.shards import ChunkShardPlan
    from data.store import FieldDataset

    torch.set_num_threads(1)
    so = json.loads(args.storage_options) if args.storage_options else None
    rank, world = args.rank, args.world
    if world > 1:
        dist.init_process_group("gloo", init_method=args.init, rank=rank, world_size=world)
    barrier = dist.barrier if world > 1 else (lambda: None)
    ds = FieldDataset(args.url, so)
    plan = ChunkShardPlan(ds.num_samples, ds.chunk_size, world, rank, seed=0)
    if args.kind == "direct":
        loader = ShardedLoader(ds, plan, BATCH)
    elif args.kind == "ray":
        from data.ray_loader import RayShardedLoader
        loader = RayShardedLoader(ds, plan, BATCH, storage_options=so, chunks_per_block=args.chunks_per_block,
                                  read_cpus=args.read_cpus, ray_address=args.ray_address or None,
                                  group=f"bench-{args.init}")
    records = []
    for epoch in range(args.epochs):
        barrier()
        dropped = rank == 0 and args.drop_caches and drop_caches()
        barrier()
        t0 = time.perf_counter()
        if args.kind == "raw":
            samples = _raw_epoch(ds)
        else:
            samples = sum(len(x) for x, _ in loader)
        barrier()
        records.append({"epoch": epoch, "samples": samples, "seconds": time.perf_counter() - t0,
                        "cache_dropped": dropped})
    if args.kind != "raw":
        loader.close()
    if world > 1:
        from launch.rendezvous import destroy_distributed
        destroy_distributed()
    print("RESULT " + json.dumps(records), flush=True)


def measure(kind: str, url: str, so: dict | None, world: int, epochs: int, chunks_per_block: int,
            local: bool, read_cpus: float = 0.25, ray_address: str = "", timeout: float = 900) -> dict:
    """Run `world` worker processes; samples/s of the last epoch, summed over ranks."""
    tmp = tempfile.mkdtemp(prefix="ftb-data-")
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, __file__, "--worker", "--kind", kind, "--url", url, "--world", str(world),
           "--epochs", str(epochs), "--chunks-per-block", str(chunks_per_block), "--read-cpus", str(read_cpus),
           "--ray-address", ray_address,
           "--init", Path(tmp, "pg").as_uri(), "--storage-options", json.dumps(so) if so else ""]
    cmd += ["--drop-caches"] if local else []
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, start_new_session=True) for r in range(world)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    per_rank = []
    for p, (out, err) in zip(procs, outs):
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            return {"error": err.strip()[-1500:] or f"exit code {p.returncode}"}
        per_rank.append(json.loads(lines[-1][len("RESULT "):]))
    last = [r[-1] for r in per_rank]
    seconds = max(r["seconds"] for r in last)
    samples = sum(r["samples"] for r in last)
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
            "first_epoch_s": max(r[0]["seconds"] for r in per_rank),
            "cache_dropped": any(r["cache_dropped"] for r in per_rank[0])}


def _show(label: str, r: dict) -> None:
    print(f"  {label}: " + (f"{r['samples_per_s']:9.0f} samples/s" if "samples_per_s" in r else f"ERROR {r['error']}"),
          flush=True)


def run_throughput(args: argparse.Namespace, out: Path) -> list[dict]:
    arrays = build_arrays(args.repeat)
    n = len(arrays[0])
    server = MotoServer() if "s3" in args.storages else None
    local_dir = Path(tempfile.mkdtemp(prefix="ftb-data-stores-", dir=args.store_dir))
    records = []
    try:
        for storage in args.storages:
            for codec in args.codecs:
                if storage == "local":
                    url, so = str(local_dir / f"darcy-{codec}.zarr"), None
                else:
                    url, so = f"s3://bench/darcy-{codec}.zarr", server.options
                t0 = time.perf_counter()
                write_store(url, arrays, args.chunk_size, codec, so)
                print(f"wrote {n} samples to {url} ({codec}) in {time.perf_counter() - t0:.1f} s", flush=True)
                raw = None
                for kind, world in [("raw", 1)] + [(k, w) for k in args.loaders for w in args.ranks]:
                    r = measure(kind, url, so, world, args.epochs, args.chunks_per_block, storage == "local")
                    rec = {"storage": storage, "codec": codec, "loader": kind, "ranks": world,
                           "samples_in_store": n, "chunk_size": args.chunk_size,
                           "chunks_per_block": args.chunks_per_block if kind == "ray" else None, **r}
                    if kind == "raw" and "samples_per_s" in r:
                        raw = r["samples_per_s"]
                    if raw and "samples_per_s" in r:
                        rec["x_raw"] = r["samples_per_s"] / raw
                    records.append(rec)
                    _show(f"{kind:6s} {world} rank(s)", r)
                    write_results(out, "throughput", [rec], THROUGHPUT_COLUMNS)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(local_dir, ignore_errors=True)
    return records


# ---- the Ray path against the number of Ray nodes -------------------------------------------------------
class LocalRayNodes:
    """K Ray nodes on this host (`ray start`, one raylet each, `cpus` CPUs each) in a private temp dir."""

    def __init__(self, k: int, cpus: int) -> None:
        from launch.local import free_port
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.port, self.tmp = free_port(), tempfile.mkdtemp(prefix="ftb-ray-")
        # A new cluster turns on token auth; drivers joining by address must say so before `import ray`.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_worker_niceness": "0"}
        self.env.pop("RAY_ADDRESS", None)
        common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--disable-usage-stats"]
        self._run("start", "--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.tmp}",
                  *common)
        for _ in range(k - 1):
            self._run("start", f"--address={self.address}", *common)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, *args: str) -> None:
        proc = subprocess.run([self.ray, *args], env=self.env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{proc.stderr[-2000:]}")

    def stop(self) -> None:
        # `ray stop` would stop every Ray cluster on the host; stop only ours, by its session directory.
        subprocess.run(["pkill", "-9", "-f", self.tmp], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_node_scaling(args: argparse.Namespace, out: Path) -> list[dict]:
    """The Ray path (1 consumer) over K local Ray nodes of one CPU each, read tasks taking a whole CPU."""
    arrays = build_arrays(args.repeat)
    local_dir = Path(tempfile.mkdtemp(prefix="ftb-data-stores-", dir=args.store_dir))
    url = str(local_dir / "darcy-blosc-lz4.zarr")
    write_store(url, arrays, args.chunk_size, "blosc-lz4", None)
    records = []
    try:
        for k in args.ray_nodes:
            nodes = LocalRayNodes(k, cpus=1)
            try:
                os.environ["RAY_AUTH_MODE"] = "token"
                r = measure("ray", url, None, 1, args.epochs, args.chunks_per_block, True, read_cpus=1.0,
                            ray_address=nodes.address)
            finally:
                os.environ.pop("RAY_AUTH_MODE", None)
                nodes.stop()
            rec = {"nodes": k, "cpus_per_node": 1, **r}
            records.append(rec)
            _show(f"ray over {k} node(s)", r)
            write_results(out, "ray_nodes", [rec], NODE_COLUMNS)
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)
    return records


THROUGHPUT_COLUMNS = ["storage", "codec", "loader", "ranks", "samples_per_s", "x_raw", "seconds", "first_epoch_s",
                      "cache_dropped", "samples_in_store", "chunk_size", "chunks_per_block", "error"]
NODE_COLUMNS = ["nodes", "cpus_per_node", "samples_per_s", "seconds", "first_epoch_s", "error"]
STEP_COLUMNS = ["loader", "ranks", "steps", "step_s", "data_wait_s", "wait_share", "run_wait_share", "error"]


# ---- share of a training step spent waiting for data ---------------------------------------------------
def run_step_wait(args: argparse.Namespace, out: Path) -> list[dict]:
    ensure_data()
    records = []
    for kind in args.loaders:
        for world in args.ranks:
            run_dir = out / "runs" / f"{kind}-{world}"
            sets = [f"data.path={DATA}", f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}",
                    f"data.loader={kind}", f"train.max_steps={args.train_steps}", "train.log_every=1",
                    "train.eval_every=0", "train.ckpt_every=0", "train.progress=false", *MODEL]
            cmd = [sys.executable, "-m", "launch.cli", "train", str(CONFIG), "--nproc", str(world), "--overwrite",
                   *[a for s in sets for a in ("--set", s)]]
            env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
            env.pop("RAY_ADDRESS", None)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800,
                                  check=False)
            rec = {"loader": kind, "ranks": world}
            if proc.returncode != 0:
                rec["error"] = proc.stderr.strip()[-1500:]
            else:
                rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("data_wait_s")]
                rows = rows[WARMUP_STEPS:]
                wait = [float(r["data_wait_s"]) for r in rows]
                step = [float(r["step_time_s"]) for r in rows]
                summary = json.loads((run_dir / "summary.json").read_text())
                rec.update(steps=len(rows), step_s=statistics.median(step), data_wait_s=statistics.median(wait),
                           wait_share=sum(wait) / (sum(wait) + sum(step)), run_wait_share=summary["data_wait_share"])
            records.append(rec)
            print(f"  train {kind:6s} {world} rank(s): "
                  + (f"wait share {rec['wait_share']:.2%}" if "wait_share" in rec else f"ERROR {rec['error']}"),
                  flush=True)
            write_results(out, "step_wait", [rec], STEP_COLUMNS)
    return records


# ---- report --------------------------------------------------------------------------------------------
def report(throughput: list[dict], nodes: list[dict], waits: list[dict]) -> None:
    if throughput:
        lines = []
        for r in throughput:
            target = TARGETS.get(r["loader"])
            verdict = "" if target is None or "x_raw" not in r else ("met" if r["x_raw"] >= target else "MISSED")
            lines.append([r["storage"], r["codec"], r["loader"], str(r["ranks"]), _fmt(r.get("samples_per_s"), ".0f"),
                          _fmt(r.get("x_raw"), ".2f"), f">= {target}x {verdict}" if target else "limit",
                          _fmt(r.get("first_epoch_s"), ".2f"), "yes" if r.get("cache_dropped") else "no"])
        print_table(["storage", "codec", "loader", "ranks", "samples/s", "x raw", "target", "1st epoch s",
                     "cache dropped"], lines)
    if nodes:
        print_table(["Ray nodes (1 CPU each)", "samples/s", "1st epoch s"],
                    [[str(r["nodes"]), _fmt(r.get("samples_per_s"), ".0f"), _fmt(r.get("first_epoch_s"), ".2f")]
                     for r in nodes])
    if waits:
        lines = [[r["loader"], str(r["ranks"]), _fmt(r.get("step_s"), ".4f"), _fmt(r.get("data_wait_s"), ".5f"),
                  _fmt(r.get("wait_share"), ".2%"), _fmt(r.get("run_wait_share"), ".2%"),
                  ("met" if r.get("wait_share", 1) < 0.02 else "MISSED") if "wait_share" in r else "error"]
                 for r in waits]
        print_table(["loader", "ranks", "median step s", "median wait s", "wait share", "whole run", "< 2%"], lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/data-<time>)")
    p.add_argument("--quick", action="store_true", help="local disk, lz4, 1 and 2 ranks, no S3")
    p.add_argument("--storages", default="local,s3")
    p.add_argument("--codecs", default="blosc-lz4,zstd")
    p.add_argument("--loaders", default="direct,ray")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--repeat", type=int, default=16, help="the 512 Darcy samples repeated this often (16: 256 MiB)")
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--chunks-per-block", type=int, default=16, help="Ray read-task size, in chunks")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--ray-nodes", default="1,2", help="node counts for the Ray scaling rows ('' to skip)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--store-dir", default=None, help="where local stores are written (default: the temp dir)")
    # one rank of a measurement (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    p.add_argument("--storage-options", default="", help=argparse.SUPPRESS)
    p.add_argument("--drop-caches", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--read-cpus", type=float, default=0.25, help=argparse.SUPPRESS)
    p.add_argument("--ray-address", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.storages, args.codecs, args.ray_nodes = "local", "blosc-lz4", ""
    args.storages, args.codecs = args.storages.split(","), args.codecs.split(",")
    args.loaders, args.ranks = args.loaders.split(","), [int(r) for r in args.ranks.split(",")]
    for s in args.storages:
        if s not in ("local", "s3"):
            raise SystemExit(f"--storages: unknown {s!r} (local, s3)")
    out = args.out or ROOT / "bench" / "results" / time.strftime("data-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"argv": sys.argv[1:], "loadavg_at_start": os.getloadavg(), "cpus": os.cpu_count(),
            "page_cache_droppable": os.access("/proc/sys/vm/drop_caches", os.W_OK)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    args.ray_nodes = [int(k) for k in args.ray_nodes.split(",") if k]
    throughput = [] if args.skip_throughput else run_throughput(args, out)
    nodes = run_node_scaling(args, out) if args.ray_nodes and not args.skip_throughput else []
    waits = [] if args.skip_train else run_step_wait(args, out)
    report(throughput, nodes, waits)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

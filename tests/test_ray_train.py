"""`fieldtrain launch ray` on a real loopback Ray cluster (recovery from a SIGKILLed worker, bit-identical
parameters), elastic resume on a different world size (plain torchrun/gloo), and bad input.

The cluster fixture runs `ray start --head` on 127.0.0.1 with its own --temp-dir and ports, so concurrent
sessions' clusters are untouched; it is stopped by killing exactly the processes that inherited its marker
variable (`ray stop` would stop every Ray process on the machine). Auth: a new Ray 2.60 cluster uses
token auth (~/.ray/auth_token); the fixture exports RAY_AUTH_MODE=token to the cluster and to every driver
it starts, so both sides agree.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SMALL_MODEL, fieldtrain
from test_train import final_state, sets

CONFIG = str(REPO / "configs" / "darcy_fno.toml")
RAY = str(Path(sys.executable).with_name("ray"))


def assert_same_parameters(a: dict, b: dict) -> None:
    for k, v in a["model_optim"]["model"].items():
        assert torch.equal(v, b["model_optim"]["model"][k]), k
    for k, v in a["model_optim"]["optim"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["model_optim"]["optim"]["state"][k][name]), (k, name)


def _our_processes(marker: str) -> list[int]:
    """Pids of the processes whose environment holds FIELDTRAIN_TEST_RAY=`marker`: everything our `ray start`
    started, and their children (Ray renames its agents, `ray::DashboardAgent`, so command lines do not tell)."""
    pids, needle = [], f"FIELDTRAIN_TEST_RAY={marker}\0".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster on loopback with 4 logical CPUs (2 real): yields (address, driver env)."""
    from launch.local import free_port
    temp = tempfile.mkdtemp(prefix="ftray", dir="/tmp")   # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    # `ray start` turns --node-ip-address=127.0.0.1 into the machine's address unless Ray believes it is on a
    # single-node platform (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): that keeps the cluster and drivers on loopback.
    env = {**os.environ, "FIELDTRAIN_TEST_RAY": temp, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1",
           "RAY_worker_niceness": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_TRAIN_V2_ENABLED": "1"}
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
           "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--node-manager-port={free_port()}",
           f"--object-manager-port={free_port()}", f"--dashboard-port={free_port()}",
           "--object-store-memory=200000000"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _our_processes(temp):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while _our_processes(temp) and time.monotonic() < deadline:
                time.sleep(0.2)
        subprocess.run(["rm", "-rf", temp], check=False)


def launch_ray(env: dict, *args: str, timeout: int = 240) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", "ray", CONFIG, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics(run: Path) -> list[dict]:
    return [row for row in csv.DictReader((run / "metrics.csv").open()) if row.get("train_loss")]


# ---- Ray Train on a real cluster ---------------------------------------------------------------------------
RAY_RUN = ["train.max_steps=120", "train.ckpt_every=10", "run.threads_per_rank=1", "data.window_chunks=1"]


@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint_with_identical_parameters(ray_cluster, small_darcy,
                                                                                   tmp_path):
    address, env = ray_cluster
    common = [f"data.path={small_darcy}", f"run.out_dir={tmp_path}", *SMALL_MODEL, *RAY_RUN]
    storage = tmp_path / "ray_storage"
    proc = launch_ray(env, "--address", address, "--workers", "2", "--max-failures", "2",
                      "--storage-path", str(storage), *sets(*common, "run.name=killed"))
    run = tmp_path / "killed"
    try:
        # Kill rank 1 once Ray's controller has registered a checkpoint (it writes this snapshot to storage then;
        # a worker killed earlier restarts from the run directory's checkpoint instead).
        deadline, victim = time.monotonic() + 180, None
        snapshot = storage / "killed" / "checkpoint_manager_snapshot.json"
        while victim is None:
            assert proc.poll() is None, proc.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "no checkpoint registered in time"
            try:
                registered = json.loads(snapshot.read_text())["latest_checkpoint_result"] is not None
            except (OSError, ValueError):
                registered = False
            if registered and (run / "workers" / "rank1.json").exists():
                victim = json.loads((run / "workers" / "rank1.json").read_text())["pid"]
            time.sleep(0.02)
        killed_at = int((run / "checkpoints" / "latest").read_text().split("_")[1])
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
        (tmp_path / "launch.log").write_text(out)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    assert killed_at < 120, "the worker was killed after the run had finished"
    assert "rank 0/2 (local 0/2) from Ray Train, on its gloo process group" in out, out[-5000:]
    assert "restoring from Ray Train's checkpoint" in out, out[-5000:]
    restarted = json.loads((run / "workers" / "rank1.json").read_text())["pid"]
    assert restarted != victim
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 120 and summary["finished"] and summary["replica_max_abs_diff"] == 0.0
    # Ray's storage holds complete DCP checkpoints (every rank's shards merged), the last one at step 120.
    last = sorted((storage / "killed").glob("step_*"))[-1]
    assert last.name == "step_00000120" and (last / ".metadata").is_file()
    assert {f.name for f in last.glob("__*_*.distcp")} >= {"__0_0.distcp", "__1_0.distcp"}

    # The same run uninterrupted, under torchrun: bit-identical parameters and optimizer state.
    straight = fieldtrain("train", CONFIG, "--nproc", "2", *sets(*common, "run.name=straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = final_state(tmp_path / "straight"), final_state(run)
    assert a["trainer"]["step"] == b["trainer"]["step"] == 120
    assert_same_parameters(a, b)
    assert a["data"] == b["data"]


def two_workers(ray_cluster, small_darcy: str, tmp_path: Path, name: str, *overrides: str) -> str:
    """`fieldtrain launch ray` with 2 workers on the test cluster, run to its end; returns its output."""
    address, env = ray_cluster
    proc = launch_ray(env, "--address", address, "--workers", "2", "--storage-path", str(tmp_path / "storage"),
                      *sets(f"data.path={small_darcy}", f"run.out_dir={tmp_path}", f"run.name={name}", *SMALL_MODEL,
                            *overrides))
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.mark.slow
def test_ray_train_workers_read_through_ray_data(ray_cluster, small_darcy, tmp_path):
    """data.loader = "ray" inside Ray Train: the workers' read tasks run on the same cluster, each worker gets
    its equal share of every epoch through streaming_split, and the replicas stay identical."""
    out = two_workers(ray_cluster, small_darcy, tmp_path, "raydata", "data.loader=ray", "data.chunks_per_block=2",
                      "train.max_steps=12")
    assert "from Ray Train" in out
    summary = json.loads((tmp_path / "raydata" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["finished"] and summary["replica_max_abs_diff"] == 0.0
    assert summary["epochs"] > 1   # 12 steps of 2 x 8 samples cross the 80-sample epoch
    losses = [float(r["train_loss"]) for r in metrics(tmp_path / "raydata")]
    assert len(losses) == 12 and losses[-1] < losses[0]


@pytest.mark.slow
def test_ray_train_workers_run_a_sharded_engine(ray_cluster, small_darcy, tmp_path):
    """FSDP2 and DeepSpeed join the process group Ray Train set up, like DDP: ZeRO-2 with int8 here."""
    two_workers(ray_cluster, small_darcy, tmp_path, "zero2", "parallel.engine=deepspeed", "parallel.zero_stage=2",
                "comm.compressor=int8", "train.max_steps=8")
    summary = json.loads((tmp_path / "zero2" / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["compressor"] == "int8" and summary["world_size"] == 2
    assert summary["steps"] == 8 and summary["finished"] and summary["replica_max_abs_diff"] == 0.0


@pytest.mark.parametrize("args, named", [
    (["--workers", "3..2"], "--workers '3..2'"),
    (["--workers", "two"], "MIN..MAX"),
    (["--workers", "2", "--max-failures", "-2"], "--max-failures -2"),
    (["--workers", "1..2", "--resize-interval", "0"], "--resize-interval 0"),
])
def test_bad_launch_arguments_are_named(args, named, tmp_path):
    r = fieldtrain("launch", "ray", CONFIG, "--address", "127.0.0.1:9", *args,
                   *sets(f"run.out_dir={tmp_path}", "data.path=x.zarr"), timeout=120)
    assert r.returncode == 2 and named in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())


def test_unreachable_address_is_a_clear_error(tmp_path):
    """Refused by the launcher's own reachability check (its message), not after ray.init's minute of retries."""
    from launch.local import free_port
    r = fieldtrain("launch", "ray", CONFIG, "--address", f"127.0.0.1:{free_port()}", "--workers", "2",
                   *sets(f"run.out_dir={tmp_path}", "data.path=x.zarr"), timeout=120)
    assert r.returncode == 2
    assert "no Ray cluster reachable" in r.stderr and "ray start --head" in r.stderr, r.stderr
    assert "ray.init" not in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())


# ---- elastic resume on another world size (torchrun + gloo) --------------------------------------------------
@pytest.mark.slow
def test_resume_on_twice_the_ranks_rescales_lr_and_continues_the_epoch(small_darcy, tmp_path):
    """2 ranks stop after step 3 (24 of the epoch's 80 samples); 4 ranks resume: the LR is x sqrt(2) (Adam,
    global batch 8 -> 16), the epoch's other 56 samples are read exactly once (the epoch ends at step 7 with
    80 samples seen), PowerSGD keeps Q and resets the per-rank error feedback, and the run completes."""
    common = sets(f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "run.name=elastic", *SMALL_MODEL,
                  "data.batch_size=4", "train.max_steps=12", "optim.scheduler=constant", "comm.compressor=powersgd")
    first = fieldtrain("train", CONFIG, "--nproc", "2", *common, "--stop-after-step", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "elastic"
    at_3 = final_state(run)
    assert at_3["data"]["cursor"] == 12 and at_3["trainer"]["world_size"] == 2

    second = fieldtrain("train", CONFIG, "--nproc", "4", *common, "--resume", "--stop-after-step", "7")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "learning rate x 1.41421" in second.stderr and "square-root rule" in second.stderr, second.stderr[-3000:]
    assert "local error-feedback state reset (world size changed)" in second.stderr
    at_7 = final_state(run)
    assert at_7["trainer"]["samples_seen"] == 80 and at_7["trainer"]["world_size"] == 4
    assert (at_7["data"]["epoch"], at_7["data"]["cursor"], at_7["data"]["reshards"]) == (1, 0, "")
    assert at_7["trainer"]["lr_global_batch"] == 8

    third = fieldtrain("train", CONFIG, "--nproc", "4", *common, "--resume")
    assert third.returncode == 0, third.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["finished"] and summary["world_size"] == 4
    assert summary["replica_max_abs_diff"] == 0.0
    lrs = {int(r["step"]): float(r["lr"]) for r in metrics(run)}
    assert all(lrs[s] == 1e-2 for s in (1, 2, 3))
    assert all(math.isclose(lrs[s], 1e-2 * math.sqrt(2), rel_tol=1e-12) for s in range(4, 13))


def test_batch_lr_scale_rules():
    from trainer.optim import batch_lr_scale
    assert batch_lr_scale("sgd", 32, 8) == 4.0 and batch_lr_scale("sgd", 4, 8) == 0.5
    assert batch_lr_scale("adam", 32, 8) == 2.0 and batch_lr_scale("adamw", 8, 16) == math.sqrt(0.5)


@pytest.mark.parametrize("n, chunk, worlds, cursors", [
    (80, 16, (2, 4), (12,)),            # the end-to-end case above
    (80, 16, (2, 1), (12,)),
    (96, 8, (4, 2, 3), (5, 15)),        # resharded twice within one epoch
    (80, 16, (2, 4), (0,)),             # at an epoch start: the plain plan of the new world
])
def test_resharded_epoch_reads_every_sample_once(n, chunk, worlds, cursors):
    """Samples consumed before each world-size change plus those left after it are the epoch's stream,
    each exactly once, and the resharded plan survives its own state_dict round trip."""
    from data.shards import ChunkShardPlan
    plans = [ChunkShardPlan(n, chunk, worlds[0], r, seed=5) for r in range(worlds[0])]
    for p in plans:
        p.set_epoch(3)
    stream = plans[0].global_stream(3)
    seen = []
    for new_world, cursor in zip(worlds[1:], cursors):
        for p in plans:
            seen.append(p.epoch_indices(3)[p.cursor:cursor])
            p.advance(cursor - p.cursor)
        state = plans[0].state_dict()
        plans = [ChunkShardPlan(n, chunk, new_world, r, seed=5) for r in range(new_world)]
        for p in plans:
            p.load_state_dict(state)
        again = ChunkShardPlan(n, chunk, new_world, new_world - 1, seed=5)
        again.load_state_dict(plans[-1].state_dict())
        np.testing.assert_array_equal(again.remaining_indices(), plans[-1].remaining_indices())
    assert plans[0].epoch == 3
    rest = np.concatenate([p.remaining_indices() for p in plans])
    everything = np.concatenate([*seen, rest])
    assert len(everything) == len(stream) and sorted(everything.tolist()) == sorted(stream.tolist())
    plans[0].advance(plans[0].samples_per_rank - plans[0].cursor)   # the next epoch is the plain plan again
    assert plans[0].epoch == 4 and plans[0].reshards == []
    np.testing.assert_array_equal(plans[0].epoch_indices(4),
                                  ChunkShardPlan(n, chunk, worlds[-1], 0, seed=5).epoch_indices(4))


def test_cluster_yaml_is_a_valid_autoscaler_config():
    import jsonschema
    import ray
    import yaml
    cfg = yaml.safe_load((REPO / "launch" / "ray_cluster.yaml").read_text())
    jsonschema.validate(cfg, json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text()))
    assert cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1

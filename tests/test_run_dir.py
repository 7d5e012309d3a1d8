"""One run per run directory, resume against the checkpoint's config, metrics that do not repeat, clean teardown,
validated configs (issue 9: defects 2, 5, 6, 7, 8, 11)."""

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import REPO, SMALL_MODEL, fieldtrain
from test_train import final_state, sets

CONFIG = str(REPO / "configs" / "darcy_fno.toml")


def common(data: str, out: Path, *extra: str) -> list[str]:
    return sets(f"data.path={data}", f"run.out_dir={out}", "run.name=run", *SMALL_MODEL, *extra)


def metric_rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory (but its lock) with its bytes: to show that a refused run wrote nothing."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(small_darcy, tmp_path_factory) -> Path:
    """A one-rank run of 6 steps with checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("finished")
    r = fieldtrain("train", CONFIG, *common(small_darcy, out, "train.max_steps=6", "train.ckpt_every=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "run"


# ---- 2: evaluation with fewer test samples than ranks ---------------------------------------------------------
@pytest.mark.slow
def test_evaluation_with_fewer_test_samples_than_ranks(tmp_path):
    """97 samples in chunks of 16: the test split is one sample, so rank 0's share is empty."""
    from data.darcy import write_darcy_dataset
    url = str(tmp_path / "darcy97.zarr")
    write_darcy_dataset(url, n=97, res=17, seed=0, chunk_size=16, fine_factor=2)
    r = fieldtrain("train", CONFIG, "--nproc", "2", *common(url, tmp_path, "train.max_steps=5"))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_samples"] == 1 and 0 < summary["test_rel_l2"] < 10


# ---- 5: one run per directory ---------------------------------------------------------------------------------
def test_a_second_run_is_refused_naming_the_holder(small_darcy, tmp_path):
    from trainer.rundir import RunDirLock
    with RunDirLock(tmp_path / "run"):   # this process plays the running run
        r = fieldtrain("train", CONFIG, "--nproc", "2", *common(small_darcy, tmp_path, "train.max_steps=2"))
    assert r.returncode == 2
    assert f"pid {os.getpid()}" in r.stderr and "in use by another run" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists() and not (tmp_path / "run" / "config.json").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(small_darcy, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                           "since": "2026-01-01 00:00:00", "command": "fieldtrain train old"}))
    r = fieldtrain("train", CONFIG, *common(small_darcy, tmp_path, "train.max_steps=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "has ended; taking the lock" in r.stderr and "fieldtrain train old" in r.stderr


@pytest.mark.slow
def test_two_concurrent_runs_the_second_is_refused(small_darcy, tmp_path):
    args = [sys.executable, "-m", "launch.cli", "train", CONFIG, "--nproc", "2",
            *common(small_darcy, tmp_path, "train.max_steps=2000", "train.log_every=1")]
    first = subprocess.Popen(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "run" / "metrics.csv"
        for _ in range(600):
            if metrics.exists() and len(metrics.read_text().splitlines()) > 2:
                break
            assert first.poll() is None, first.stderr.read()[-3000:]
            threading.Event().wait(0.2)
        before = metrics.read_text()
        second = fieldtrain("train", CONFIG, *common(small_darcy, tmp_path, "train.max_steps=3"))
        assert second.returncode == 2 and "in use by another run" in second.stderr, second.stderr[-3000:]
        assert metrics.read_text().startswith(before)   # the first run's record is untouched
    finally:
        first.terminate()
        first.wait(timeout=120)


def test_a_fresh_run_into_a_directory_with_checkpoints_needs_overwrite(small_darcy, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    r = fieldtrain("train", CONFIG, *common(small_darcy, tmp_path, "train.max_steps=6", "train.ckpt_every=3"))
    assert r.returncode == 2 and "already has checkpoints" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert snapshot(run) == before
    r = fieldtrain("train", CONFIG, *common(small_darcy, tmp_path, "train.max_steps=2"), "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert [int(row["step"]) for row in metric_rows(run) if row["train_loss"]] == [1, 2]


# ---- 6: resume with a changed config --------------------------------------------------------------------------
@pytest.mark.parametrize("change, named", [
    ("model.fno.width=24", "model.fno.width: 16 in the checkpoint, 24 now"),
    ("optim.name='sgd'", "optim.name: 'adam' in the checkpoint, 'sgd' now"),
    ("run.seed=1", "run.seed: 0 in the checkpoint, 1 now"),
])
def test_resume_refuses_what_cannot_load_and_writes_nothing(small_darcy, finished_run, tmp_path, change, named):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    r = fieldtrain("train", CONFIG, *common(small_darcy, tmp_path, "train.max_steps=9", "train.ckpt_every=3", change),
                   "--resume")
    assert r.returncode == 2, r.stderr[-3000:]
    assert named in r.stderr and "cannot change on resume" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) < 5
    assert snapshot(run) == before   # config.json included


def test_resume_refuses_another_dataset_but_takes_a_copy(small_darcy, finished_run, tmp_path):
    from data.darcy import write_darcy_dataset
    other = str(tmp_path / "other.zarr")
    write_darcy_dataset(other, n=96, res=17, seed=1, chunk_size=16, fine_factor=2)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_darcy, copy)
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    r = fieldtrain("train", CONFIG, *common(other, tmp_path, "train.max_steps=9", "train.ckpt_every=3"), "--resume")
    assert r.returncode == 2 and "is not the dataset the run was trained on" in r.stderr and "params" in r.stderr
    r = fieldtrain("train", CONFIG, *common(str(copy), tmp_path, "train.max_steps=9", "train.ckpt_every=3"),
                   "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data.path changed" in r.stderr and "train.max_steps changed from 6 to 9" in r.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 9
    assert json.loads((run / "config.json").read_text())["data"]["path"] == str(copy)


def test_resume_with_another_batch_size_follows_the_lr_rule(small_darcy, finished_run, tmp_path):
    """8 -> 4 samples per rank halves the global batch: Adam's learning rate x sqrt(1/2), logged; the epoch goes on
    from the same sample (the plan's cursor counts samples, not batches). A new optim.lr takes effect too."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    r = fieldtrain("train", CONFIG, *common(small_darcy, tmp_path, "train.max_steps=8", "train.ckpt_every=3",
                                            "data.batch_size=4", "optim.scheduler='constant'", "optim.lr=2e-2"),
                   "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "optim.lr changed from 0.01 to 0.02" in r.stderr
    assert '"glibc_hugepages": true' in r.stderr         # the console script re-executed itself with the tunable
    assert "data.batch_size changed from 8 to 4" in r.stderr and "learning rate x 0.707107" in r.stderr, r.stderr
    state = final_state(run)
    assert state["trainer"]["step"] == 8 and state["trainer"]["batch_size"] == 4
    assert state["trainer"]["lr_global_batch"] == 8   # the batch optim.lr is meant for stays the first run's
    lr = state["model_optim"]["optim"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(2e-2 * 0.5 ** 0.5, rel=1e-12)
    assert state["data"]["cursor"] == (6 * 8 + 2 * 4) % 80   # 6 batches of 8, then 2 of 4, in an 80-sample epoch


def test_resume_with_an_unchanged_config_is_bit_identical_in_process(small_darcy, tmp_path):
    """The resume-time re-application of optimizer settings changes nothing when nothing changed."""
    from trainer.config import load_config
    from trainer.train import Trainer
    overrides = [f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "train.max_steps=6", *SMALL_MODEL]
    straight = Trainer(load_config(CONFIG, [*overrides, "run.name=straight"]))
    straight.train()
    staged_cfg = load_config(CONFIG, [*overrides, "run.name=staged"])
    Trainer(staged_cfg).train(until_step=3)
    Trainer(staged_cfg, resume=True).train()
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "staged")
    for k, v in a["model_optim"]["model"].items():
        assert torch.equal(v, b["model_optim"]["model"][k]), k
    assert a["model_optim"]["optim"]["param_groups"] == b["model_optim"]["optim"]["param_groups"]


# ---- 7: every config section validated, before any rank starts ------------------------------------------------
@pytest.mark.parametrize("override, named", [
    ("run.threads_per_rank=-1", "run.threads_per_rank"),
    ("run.name='a/b'", "run.name"),
    ("run.seed=-3", "run.seed"),
    ("model.fno.padding=-1", "model.fno.padding"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.momentum=1.5", "optim.momentum"),
    ("data.storage_options=3", "data.storage_options"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("dist.timeout_s=0", "dist.timeout_s"),
    ("comm.topk.density=2.0", "comm.topk.density"),
])
def test_bad_config_values_are_named_before_any_rank_starts(small_darcy, tmp_path, override, named):
    r = fieldtrain("train", CONFIG, "--nproc", "2", *common(small_darcy, tmp_path, override))
    assert r.returncode == 2
    assert named in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "torch.distributed" not in r.stderr and len(r.stderr.splitlines()) < 4
    assert not (tmp_path / "run").exists()


def test_a_bad_store_under_nproc_is_one_line_before_any_rank_starts(tmp_path):
    r = fieldtrain("train", CONFIG, "--nproc", "2", *common(str(tmp_path / "missing.zarr"), tmp_path))
    assert r.returncode == 2 and "missing.zarr" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) < 4, r.stderr


# ---- 8 and 11: metrics after a crash, teardown on an exception ------------------------------------------------
def test_a_resumed_run_rewinds_metrics_and_tensorboard_to_its_checkpoint(small_darcy, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.config import load_config
    from trainer.rundir import RunDirLock
    from trainer.train import Trainer

    cfg = load_config(CONFIG, [f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "train.max_steps=8",
                               "train.ckpt_every=4", *SMALL_MODEL])
    trainer = Trainer(cfg)
    real_step = trainer.train_step

    def crash_at_7(batch):
        if trainer.state.step == 6:
            raise RuntimeError("node lost")
        return real_step(batch)

    monkeypatch.setattr(trainer, "train_step", crash_at_7)
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.train()
    # 11: the exception released everything: no loader thread, no lock
    assert not [t for t in threading.enumerate() if t.name.startswith("fieldtrain-")]
    with RunDirLock(cfg.run_dir):   # would raise if the crashed trainer still held it
        pass
    assert [int(r["step"]) for r in metric_rows(cfg.run_dir) if r["train_loss"]] == [1, 2, 3, 4, 5, 6]

    Trainer(cfg, resume=True).train()
    steps = [int(r["step"]) for r in metric_rows(cfg.run_dir) if r["train_loss"]]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    acc = EventAccumulator(str(cfg.run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2, 3, 4, 5, 6, 7, 8]


# ---- a corrupt test chunk is found at start-up, not at the end of training ------------------------------------
@pytest.mark.slow
def test_a_corrupt_test_chunk_stops_the_run_before_the_first_step(small_darcy, tmp_path):
    store = tmp_path / "darcy.zarr"
    shutil.copytree(small_darcy, store)
    chunk = next((store / "targets" / "c" / "5").rglob("*"))   # chunk 5 of 6: the test split
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    r = fieldtrain("train", CONFIG, "--nproc", "2", *common(str(store), tmp_path, "train.max_steps=50"))
    assert r.returncode != 0
    assert "chunk 5 of array 'targets'" in r.stderr and "checksum mismatch" in r.stderr, r.stderr[-3000:]
    assert "in the test split" in r.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_step_scheduler_multiplies_the_lr_by_gamma_every_step_size_steps(small_darcy, tmp_path):
    """optim.scheduler = "step" (DDS's schedule, torch's StepLR): lr gamma^((s - warmup) // step_size) after a linear
    warm-up of `warmup_steps`."""
    from trainer.config import load_config
    from trainer.train import Trainer
    t = Trainer(load_config(CONFIG, [f"data.path={small_darcy}", f"run.out_dir={tmp_path}", *SMALL_MODEL,
                                     "optim.lr=5e-3", "optim.scheduler=step", "optim.step_size=3", "optim.gamma=0.5",
                                     "optim.warmup_steps=2"]))
    lrs = []
    for _ in range(9):
        lrs.append(t.scheduler.get_last_lr()[0])
        t.scheduler.step()
    want = [5e-3 * f for f in (0.5, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25)]
    assert lrs == pytest.approx(want, rel=1e-12)


def test_hugepage_malloc_env_adds_the_tunable_once():
    from launch.cli import HUGEPAGE_TUNABLE, hugepage_malloc_env
    assert hugepage_malloc_env({})["GLIBC_TUNABLES"] == HUGEPAGE_TUNABLE
    assert hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGEPAGE_TUNABLE}", "X": "1"}
    assert hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None      # the user's choice stands
    assert hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) is None
    assert hugepage_malloc_env({"FIELDTRAIN_HUGEPAGES": "0"}) is None


def test_default_threads_follow_omp_num_threads_then_the_cores(monkeypatch):
    """run.threads_per_rank = 0 takes OMP_NUM_THREADS where it is set (torchrun, Ray workers, our --nproc launcher),
    else this process's cores over the ranks of its node; never 0."""
    import os

    from launch.run import default_threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(1) == 3 and default_threads(8) == 3
    for unset in ("", "0", "x"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        cores = len(os.sched_getaffinity(0))
        assert default_threads(1) == cores and default_threads(cores + 1) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads(2) == max(1, len(os.sched_getaffinity(0)) // 2)

"""Checkpoints on a full disk and across a power loss: a save that cannot fit says so (directory, bytes needed,
bytes free) on every rank and leaves the previous checkpoint usable; everything is fsynced before `latest` moves."""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, SMALL_MODEL, fieldtrain, run_two_ranks
from test_train import assert_same_state, final_state
from trainer import checkpoint as ckpt_mod
from trainer.checkpoint import BLOCK, CheckpointManager, CheckpointNoSpaceError, checkpoint_bytes, state_dict_bytes

CONFIG = str(REPO / "configs" / "darcy_fno.toml")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size_bytes, name) -> a fresh tmpfs of that size under tmp_path; unmounted afterwards."""
    mounted = []

    def mount(size: int, name: str = "fs") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        where = tmp_path / name
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def resize(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


class Blob(nn.Module):
    """State that appears after the last checkpoint (so that checkpoint's size underestimates the next one)."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("data", torch.randn(n))


# ---- (a) the disk fills up during a save ------------------------------------------------------------------------
def _as_from_another_rank(real_save):
    """dcp.save whose failures look as another rank's do after DCP gathers them: pickled, so an OSError wrapped in
    torch.save's "unexpected pos" RuntimeError is gone and only the free space can tell."""
    import pickle

    from torch.distributed.checkpoint.api import CheckpointException

    def save(state, checkpoint_id):
        try:
            real_save(state, checkpoint_id=checkpoint_id)
            return
        except CheckpointException as e:
            remote = {rank: (pickle.loads(pickle.dumps(exc)), trace) for rank, (exc, trace) in e.failures.items()}
        error = CheckpointException("write", remote)
        assert not ckpt_mod._says_no_space(error), remote
        raise error
    return save


@pytest.mark.parametrize("failure", ["this_rank", "another_rank"])
def test_a_save_that_runs_out_of_space_says_so_and_keeps_the_previous_checkpoint(tmpfs, monkeypatch, failure):
    if failure == "another_rank":
        monkeypatch.setattr(ckpt_mod.dcp, "save", _as_from_another_rank(ckpt_mod.dcp.save))
    torch.manual_seed(0)
    model = nn.Linear(128, 128)                         # ~66 KB
    fs = tmpfs(512 * 1024)
    manager = CheckpointManager(fs / "checkpoints", keep=2)
    first = manager.save(1, {"model": model})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    free_before = shutil.disk_usage(fs).free
    assert free_before >= checkpoint_bytes(first) + BLOCK   # the free-space check lets the next save start...
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(CheckpointNoSpaceError) as info:  # ...which then meets a full disk: 1 MB more state
        manager.save(2, {"model": model, "blob": Blob(256 * 1024)})
    e = info.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.during_save
    message = str(e)
    assert "no space left" in message and str(manager.directory) in message, message
    assert f"{e.needed} bytes" in message and f"{e.free} bytes" in message, message
    assert "step_00000001" in message    # what `latest` still names
    assert isinstance(e.__cause__, BaseException)        # DCP's own report stays attached
    assert manager.latest() == first
    assert not list(manager.directory.glob("*.tmp"))
    assert shutil.disk_usage(fs).free == free_before == e.free   # the partial step_00000002.tmp is gone
    fresh = nn.Linear(128, 128)
    assert manager.load({"model": fresh}) == first
    for k, v in saved.items():
        assert torch.equal(fresh.state_dict()[k], v), k


# ---- (b) the free-space check before a save ---------------------------------------------------------------------
@pytest.fixture
def free_space(monkeypatch):
    """Set the free bytes shutil.disk_usage reports (None: the real figure)."""
    real, reported = shutil.disk_usage, {"free": None}

    def disk_usage(path):
        usage = real(path)
        return usage if reported["free"] is None else usage._replace(free=reported["free"])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return reported


def test_b_the_free_space_check_refuses_a_save_that_cannot_fit_and_writes_nothing(tmp_path, free_space, monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    state = {"model": model, "rng": ckpt_mod.RNGState(0)}
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", keep=3)
    real_save = ckpt_mod.dcp.save

    def must_not_write(*args, **kwargs):
        raise AssertionError("a refused save started writing")

    # First save: nothing to measure yet, so the estimate from the state dict (tensor bytes + a margin).
    needed = state_dict_bytes(state, world_size=1)
    free_space["free"] = needed - 1
    monkeypatch.setattr(ckpt_mod.dcp, "save", must_not_write)
    with pytest.raises(CheckpointNoSpaceError) as info:
        manager.save(10, state)
    e = info.value
    assert (e.errno, e.needed, e.free, e.during_save) == (errno.ENOSPC, needed, needed - 1, False)
    message = str(e)
    for part in ("no space left", str(manager.directory), f"needs ~{needed} bytes", f"{needed - 1} bytes",
                 "train.keep_checkpoints=3", "4 checkpoints", "nothing was written"):
        assert part in message, (part, message)
    assert not (tmp_path / "run").exists()

    free_space["free"] = needed   # just enough
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    first = manager.save(10, state)
    assert checkpoint_bytes(first) <= needed   # the estimate is an upper bound of what DCP writes

    # Later saves: the previous checkpoint's size on disk (plus a block).
    needed = checkpoint_bytes(first) + BLOCK
    free_space["free"] = needed - 1
    before = sorted(p.name for p in manager.directory.iterdir())
    monkeypatch.setattr(ckpt_mod.dcp, "save", must_not_write)
    with pytest.raises(CheckpointNoSpaceError, match=f"needs ~{needed} bytes") as info:
        manager.save(20, state)
    assert info.value.latest == "step_00000010" and "`latest` still names step_00000010" in str(info.value)
    assert sorted(p.name for p in manager.directory.iterdir()) == before
    assert manager.latest() == first


def test_state_dict_estimate_counts_per_rank_entries_once_per_rank():
    one = state_dict_bytes({"rng": ckpt_mod.RNGState(0)}, world_size=1)
    four = state_dict_bytes({"rng": ckpt_mod.RNGState(0)}, world_size=4)
    rng_bytes = torch.get_rng_state().numel()
    assert four - one >= 3 * rng_bytes


# ---- (d) fsync order --------------------------------------------------------------------------------------------
def test_d_everything_is_fsynced_before_latest_moves(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    manager = CheckpointManager(tmp_path / "checkpoints", keep=1)
    manager.save(1, {"model": model})
    (manager.directory / "latest.tmp").write_text("junk")   # a stale marker from a crash is cleared first
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = manager.save(2, {"model": model})
    monkeypatch.undo()

    d = manager.directory.resolve()
    tmp, final, latest_tmp = d / "step_00000002.tmp", final.resolve(), d / "latest.tmp"

    def at(*event) -> int:
        assert event in events, (event, events)
        return events.index(event)

    data = [i for i, ev in enumerate(events) if ev[0] == "fsync" and ev[1].startswith(f"{tmp}/__")]
    assert data, events                                  # DCP's data files, fsynced where they were written
    metadata = at("fsync", f"{tmp}/.metadata.tmp")
    renamed = at("replace", str(tmp), str(final))
    published = at("replace", str(latest_tmp), str(d / "latest"))
    assert max(data) < metadata < at("fsync", str(tmp)) < renamed
    assert renamed < at("fsync", str(final)) < published
    parent_syncs = [i for i, ev in enumerate(events) if ev == ("fsync", str(d))]
    assert any(renamed < i < published for i in parent_syncs)     # the rename is durable before `latest` moves
    assert any(i > published for i in parent_syncs)               # and so is `latest`
    assert renamed < at("fsync", str(latest_tmp)) < published
    assert (d / "latest").read_text() == "step_00000002" and not latest_tmp.exists()
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_00000002"]


# ---- two ranks: every rank raises, none hangs -------------------------------------------------------------------
def _two_rank_worker(rank: int, port: int, fs: str, out: str) -> None:
    import datetime

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    results = {}
    torch.manual_seed(0)
    model = nn.Linear(128, 128)
    manager = CheckpointManager(Path(fs) / "checkpoints", keep=2)
    manager.save(1, {"model": model, "rng": ckpt_mod.RNGState(rank)})
    # Rank 0 alone sees too little free space: its verdict is every rank's.
    real = shutil.disk_usage
    if rank == 0:
        shutil.disk_usage = lambda p: real(p)._replace(free=0)
    for name, state in [("precheck", {"model": model}),
                        ("during", {"model": model, "blob": Blob(256 * 1024)})]:
        try:
            manager.save(2, state)
            results[name] = "saved"
        except CheckpointNoSpaceError as e:
            results[name] = {"error": str(e), "during": e.during_save}
        shutil.disk_usage = real
    dist.barrier()
    results["latest"] = manager.latest().name
    results["tmp"] = sorted(p.name for p in manager.directory.glob("*.tmp"))
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    from launch.rendezvous import destroy_distributed
    destroy_distributed()


@pytest.mark.slow
def test_two_ranks_all_raise_on_a_full_disk_and_none_hangs(tmpfs, tmp_path):
    fs = tmpfs(640 * 1024)
    run_two_ranks(_two_rank_worker, (str(fs), str(tmp_path)), "spawn", 180, "in a checkpoint save on a full disk")
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["latest"] == "step_00000001" and r["tmp"] == [], r
        for name in ("precheck", "during"):
            assert isinstance(r[name], dict), (rank, name, r)
            assert "no space left" in r[name]["error"] and str(fs / "checkpoints") in r[name]["error"]
            assert r[name]["during"] == (name == "during")


# ---- (c) end to end: a run on a small disk stops clearly, and resumes exactly once there is room ----------------
def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _disk_bytes(directory: Path, skip: str = "checkpoints") -> int:
    return sum(checkpoint_bytes(p) if p.is_dir() else os.stat(p).st_blocks * 512
               for p in directory.iterdir() if p.name != skip)


@pytest.mark.slow
def test_c_two_rank_run_on_a_small_disk_fails_clearly_and_resumes_exactly(small_darcy, tmp_path, tmpfs):
    common = _sets(f"data.path={small_darcy}", "train.max_steps=8", "train.ckpt_every=2", "train.keep_checkpoints=2",
                   *SMALL_MODEL)
    straight = fieldtrain("train", CONFIG, "--nproc", "2", *common, *_sets(f"run.out_dir={tmp_path}", "run.name=s"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "s"
    size = checkpoint_bytes(run / "checkpoints" / "step_00000008")
    others = _disk_bytes(run)   # metrics, TensorBoard, config, summary, lock
    # Room for 2 checkpoints and a half, so the third (keep + 1 = 3 exist while it is written) does not fit.
    fs = tmpfs(others + 2 * size + size // 2 + 16 * BLOCK)
    staged = fieldtrain("train", CONFIG, "--nproc", "2", *common, *_sets(f"run.out_dir={fs}", "run.name=t"))
    assert staged.returncode != 0
    checkpoints = fs / "t" / "checkpoints"
    assert "no space left" in staged.stderr and str(checkpoints) in staged.stderr, staged.stderr[-3000:]
    assert "checkpoint step_00000006 needs ~" in staged.stderr and " bytes (" in staged.stderr, staged.stderr[-3000:]
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002", "step_00000004"]

    resize(fs, others + 4 * size + 16 * BLOCK)   # free space, then continue
    resumed = fieldtrain("train", CONFIG, "--nproc", "2", *common, *_sets(f"run.out_dir={fs}", "run.name=t"),
                         "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_state(run), final_state(fs / "t")
    assert a["trainer"]["step"] == 8
    assert_same_state(a, b)

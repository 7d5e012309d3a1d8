"""End to end through the `fieldtrain` entry point: DDP on 2 gloo ranks, exact resume, bad input, atomic checkpoints."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import REPO, SMALL_MODEL, fieldtrain

CONFIG = str(REPO / "configs" / "darcy_fno.toml")


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def final_state(run_dir: Path) -> dict:
    """The latest checkpoint of a run as one torch.save dict (written beside the run dir: its disk may be full)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    out = run_dir.parent / f"{run_dir.name}.final.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_two_rank_ddp_lowers_loss_and_keeps_replicas_identical(small_darcy, tmp_path):
    r = fieldtrain("train", CONFIG, "--nproc", "2",
                   *sets(f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "run.name=ddp",
                         "train.max_steps=30", *SMALL_MODEL))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 30
    assert summary["replica_max_abs_diff"] == 0.0
    rows = [row for row in csv.DictReader((run / "metrics.csv").open()) if row.get("train_loss")]
    losses = [float(row["train_loss"]) for row in rows]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    # fp32 allreduce: every rank sends each gradient element once, complex weights as two floats
    state = final_state(run)
    n_floats = sum(v.numel() * (2 if v.is_complex() else 1)
                   for k, v in state["model_optim"]["model"].items())
    assert summary["grad_bytes_per_step"] == 4 * n_floats
    assert (run / "tb").is_dir() and np.isfinite(summary["test_rel_l2"])


@pytest.mark.slow
def test_resume_mid_run_gives_identical_parameters(small_darcy, tmp_path):
    common = sets(f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "train.max_steps=16",
                  "data.window_chunks=1", *SMALL_MODEL)   # 16 steps = 1.6 epochs: the resume crosses an epoch
    straight = fieldtrain("train", CONFIG, "--nproc", "2", *common, "--set", "run.name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = fieldtrain("train", CONFIG, "--nproc", "2", *common, "--set", "run.name=staged", "--stop-after-step", "7")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((tmp_path / "staged" / "summary.json").read_text())["steps"] == 7
    second = fieldtrain("train", CONFIG, "--nproc", "2", *common, "--set", "run.name=staged", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "staged")
    assert a["trainer"]["step"] == 16
    assert_same_state(a, b)


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints (as final_state gives them) hold the same step, parameters, optimizer state and data cursor,
    bit for bit."""
    assert a["trainer"]["step"] == b["trainer"]["step"]
    for k, v in a["model_optim"]["model"].items():
        assert torch.equal(v, b["model_optim"]["model"][k]), k
    for k, v in a["model_optim"]["optim"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["model_optim"]["optim"]["state"][k][name]), (k, name)
    assert a["data"] == b["data"]


def _bad_store(tmp_path: Path, kind: str) -> str:
    from data.store import write_field_dataset
    url = str(tmp_path / f"{kind}.zarr")
    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    write_field_dataset(url, x, x.copy(), chunk_size=8, generator="test", params={}, grid_bounds=[[0, 1], [0, 1]])
    group = zarr.open_group(url, mode="r+")
    if kind == "missing_array":
        del group["targets"]
    elif kind == "length_mismatch":
        zarr.create_array(group.store, name="targets", shape=(24, 1, 8, 8), chunks=(8, 1, 8, 8),
                          dtype="float32", overwrite=True)[:] = x[:24]
    return url


@pytest.mark.parametrize("kind, named", [
    ("missing_store", "nowhere.zarr"),
    ("missing_array", "targets"),
    ("length_mismatch", "24"),
    ("unknown_key", "optim.lrr"),
])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, kind, named):
    data = str(tmp_path / "nowhere.zarr") if kind in ("missing_store", "unknown_key") else _bad_store(tmp_path, kind)
    out = tmp_path / "runs"
    extra = ["optim.lrr=1"] if kind == "unknown_key" else []
    r = fieldtrain("train", CONFIG, *sets(f"data.path={data}", f"run.out_dir={out}", *extra))
    assert r.returncode == 2
    assert named in r.stderr, r.stderr
    assert not out.exists()


def test_a_crash_mid_checkpoint_leaves_the_previous_one_usable(small_darcy, tmp_path, monkeypatch):
    from trainer import checkpoint as ckpt_mod
    from trainer.config import load_config
    from trainer.train import Trainer

    cfg = load_config(CONFIG, [f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "train.max_steps=6",
                               "train.ckpt_every=3", *SMALL_MODEL])
    trainer = Trainer(cfg)
    real_save = ckpt_mod.dcp.save

    def crash_after_writing(state, checkpoint_id):
        if trainer.state.step == 6:
            real_save(state, checkpoint_id=checkpoint_id)
            (Path(checkpoint_id) / ".metadata").unlink()   # died before the metadata landed
            raise RuntimeError("node lost")
        real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(ckpt_mod.dcp, "save", crash_after_writing)
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.train()
    trainer.loader.close()
    manager = trainer.checkpoints
    assert manager.latest().name == "step_00000003"
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    resumed = Trainer(cfg, resume=True)
    summary = resumed.train()
    assert summary["steps"] == 6 and manager.latest().name == "step_00000006"
    assert not list(manager.directory.glob("*.tmp"))


def test_two_rank_training_through_the_ray_data_loader(small_darcy, tmp_path):
    r = fieldtrain("train", CONFIG, "--nproc", "2",
                   *sets(f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "run.name=ray", "data.loader=ray",
                         "data.chunks_per_block=2", "train.max_steps=12", "comm.compressor=powersgd", *SMALL_MODEL))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["replica_max_abs_diff"] == 0.0
    rows = [row for row in csv.DictReader((tmp_path / "ray" / "metrics.csv").open()) if row.get("train_loss")]
    losses = [float(row["train_loss"]) for row in rows]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    state = final_state(tmp_path / "ray")
    assert state["data"]["epoch"] >= 1   # 12 steps of 2x8 samples cross the 80-sample epoch


@pytest.mark.slow
def test_training_through_the_ray_data_loader_resumes_exactly(small_darcy, tmp_path):
    """One rank reading through Ray Data tasks: the loss falls and a staged run resumes bit-identically."""
    common = sets(f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "data.loader=ray",
                  "data.chunks_per_block=2", "train.max_steps=14", *SMALL_MODEL)
    for args in (["--set", "run.name=straight"], ["--set", "run.name=staged", "--stop-after-step", "6"],
                 ["--set", "run.name=staged", "--resume"]):
        r = fieldtrain("train", CONFIG, *common, *args)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "staged")
    for k, v in a["model_optim"]["model"].items():
        assert torch.equal(v, b["model_optim"]["model"][k]), k
    rows = [row for row in csv.DictReader((tmp_path / "straight" / "metrics.csv").open()) if row.get("train_loss")]
    losses = [float(row["train_loss"]) for row in rows]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses

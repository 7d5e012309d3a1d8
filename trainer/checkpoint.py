"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout under `<run_dir>/checkpoints/`:
    step_00000100/      a complete DCP checkpoint (every rank's shards + .metadata)
    latest              the name of the newest complete checkpoint
A save writes `step_N.tmp/` on every rank, and only when DCP has finished on all ranks (it writes
`.metadata` last, after a gather) does rank 0 rename it to `step_N/` and then replace `latest`
(os.replace, atomic on POSIX). A crash at any point leaves `latest` naming the previous complete
checkpoint; stale `*.tmp` directories are removed by the next save.

Everything saved is `Stateful`: the model and optimizer (through DCP's `get_state_dict`, so DDP and
FSDP2 models load into any sharding), the scheduler, the data plan's cursor, per-rank RNG states and
the trainer's counters.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger("fieldtrain")


class ModelOptimizerState(Stateful):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer,
                       model_state_dict=state["model"], optim_state_dict=state["optim"])


class RNGState(Stateful):
    """Each rank's RNG under its own key, so DCP's de-duplication of replicated entries keeps them all."""

    def __init__(self, rank: int):
        self.rank = rank

    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return {f"rank{self.rank}": state}

    def per_rank_keys(self) -> list[str]:
        return [f"rank{self.rank}"]

    def load_state_dict(self, state: dict) -> None:
        mine = state.get(f"rank{self.rank}")
        if mine is None:
            log.warning("checkpoint has no RNG state for rank %d (saved by a smaller world); keeping the seeded RNG",
                        self.rank)
            return
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def latest(self) -> Path | None:
        marker = self.directory / "latest"
        if not marker.is_file():
            return None
        path = self.directory / marker.read_text().strip()
        if not (path / ".metadata").is_file():
            raise ValueError(f"checkpoint marker {marker} names {path}, which is not a complete checkpoint")
        return path

    def save(self, step: int, state: dict[str, Stateful]) -> Path:
        final = self.directory / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("*.tmp"):
                shutil.rmtree(stale)
        _barrier()
        dcp.save(state, checkpoint_id=tmp)
        if _rank() == 0:
            if final.exists():   # the same step saved again (e.g. a resumed run that ends where it began)
                shutil.rmtree(final)
            os.replace(tmp, final)
            marker_tmp = self.directory / "latest.tmp"
            marker_tmp.write_text(final.name)
            os.replace(marker_tmp, self.directory / "latest")
            self._prune(keep_also=final)
        _barrier()
        return final

    def _prune(self, keep_also: Path) -> None:
        done = sorted(p for p in self.directory.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-self.keep]:
            if old != keep_also:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, state: dict[str, Stateful], path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise ValueError(f"--resume: no checkpoint in {self.directory}")
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state = {name: _without_unsaved(name, obj, saved) for name, obj in state.items()}
        dcp.load(state, checkpoint_id=path)
        return path


class _Without(Stateful):
    """A Stateful minus some top-level keys (for loading per-rank entries a smaller world never saved)."""

    def __init__(self, obj: Stateful, drop: set[str]):
        self.obj, self.drop = obj, drop

    def state_dict(self) -> dict:
        return {k: v for k, v in self.obj.state_dict().items() if k not in self.drop}

    def load_state_dict(self, state: dict) -> None:
        self.obj.load_state_dict(state)


def _without_unsaved(name: str, obj, saved) -> Stateful:
    """Per-rank entries (`per_rank_keys()`) may be absent after a world-size change; everything else must exist."""
    keys = getattr(obj, "per_rank_keys", lambda: [])()
    missing = {k for k in keys if not any(s == f"{name}.{k}" or s.startswith(f"{name}.{k}.") for s in saved)}
    return _Without(obj, missing) if missing else obj

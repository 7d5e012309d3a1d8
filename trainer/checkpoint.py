"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically and durably.

Layout under `<run_dir>/checkpoints/`:
    step_00000100/      a complete DCP checkpoint (every rank's shards + .metadata)
    latest              the name of the newest complete checkpoint
A save writes `step_N.tmp/` on every rank, and only when DCP has finished on all ranks (it writes
`.metadata` last, after a gather) does rank 0 rename it to `step_N/` and then replace `latest`
(os.replace, atomic on POSIX). A crash at any point leaves `latest` naming the previous complete
checkpoint; stale `*.tmp` directories are removed by the next save.

Durability (a power loss must not leave `latest` naming data that never reached the disk), in order:
DCP fsyncs every data file on the rank that wrote it, then `.metadata` (its FileSystemWriter's default
`sync_files=True`); each rank fsyncs `step_N.tmp/`; rank 0 renames it to `step_N/`, fsyncs that and its
parent, writes and fsyncs `latest.tmp`, replaces `latest`, and fsyncs the parent again.

Disk space: a save needs room for one more checkpoint while the `keep` old ones still exist (pruning
comes after), so a directory holds `keep + 1` checkpoints at its peak. Before writing, rank 0 compares
the free space with an estimate of the checkpoint's size and all ranks agree on the verdict; a save that
runs out of space anyway (ENOSPC, which DCP reports only as a torch.save zip error) is recognised on
every rank, its partial `step_N.tmp/` removed. Both raise `CheckpointNoSpaceError` naming the directory,
the bytes needed and the bytes free; the previous checkpoint and `latest` are untouched.

Everything saved is `Stateful`: the model and optimizer (through DCP's `get_state_dict`, so DDP and
FSDP2 models load into any sharding), the scheduler, the data plan's cursor, per-rank RNG states and
the trainer's counters.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
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


# Size estimate for a first save (no previous checkpoint to measure): torch 2.13's DCP format adds ~1.7 KB
# per entry (each entry is its own torch.save record, plus its line in .metadata; measured 1.72-2.4 KB),
# and a filesystem rounds every file up to whole blocks.
ENTRY_OVERHEAD = 3 * 1024
BLOCK = 4096
PAYLOAD_MARGIN = 1.05
# A save that failed with less than this free on the checkpoint's filesystem ran out of space.
FULL_BELOW = 1 << 20


class CheckpointNoSpaceError(OSError):
    """A checkpoint does not fit on its filesystem (errno ENOSPC). Raised on every rank, either before anything
    is written (the free-space check) or after a save ran out of space (its partial directory removed); the
    previous checkpoint and `latest` are untouched, so freeing space and rerunning with --resume continues."""

    def __init__(self, directory: str | Path, step: int, needed: int, free: int, keep: int,
                 latest: str | None, during_save: bool = False):
        self.directory, self.step, self.needed, self.free = str(directory), step, needed, free
        self.keep, self.latest, self.during_save = keep, latest, during_save
        name = f"step_{step:08d}"
        if during_save:
            what = (f"ran out of space writing checkpoint {name} (estimated at ~{_size(needed)}); removed the "
                    f"partial {name}.tmp, which leaves {_size(free)} free")
        else:
            what = f"checkpoint {name} needs ~{_size(needed)} free and {_size(free)} are free; nothing was written"
        super().__init__(errno.ENOSPC,
                         f"no space left on device for checkpoints in {self.directory}: {what}. With "
                         f"train.keep_checkpoints={keep} the directory holds {keep + 1} checkpoints while saving "
                         f"(~{_size((keep + 1) * needed)}). "
                         + (f"`latest` still names {latest}. " if latest else "There is no earlier checkpoint. ")
                         + "Free space, lower train.keep_checkpoints or move run.out_dir, then rerun with --resume.")
        self.filename = self.directory

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):   # crosses processes intact (Ray Train reports a worker's exception)
        return (type(self), (self.directory, self.step, self.needed, self.free, self.keep, self.latest,
                             self.during_save))


def _size(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB)"


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(obj):
    """Rank 0's `obj` on every rank."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn, what: str):
    """fn() on rank 0, its result on every rank; if it raises, every rank raises (rank 0 the original), none hangs."""
    result = error = None
    if _rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    result, failure = _from_rank0((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if failure is not None:
        raise RuntimeError(f"rank 0 failed to {what}: {failure}")
    return result


def _any_rank(flag: bool) -> bool:
    if _world() == 1:
        return flag
    flags = [None] * _world()
    dist.all_gather_object(flags, flag)
    return any(flags)


def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it, and renames into it, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:   # some filesystems cannot fsync a directory; their renames are as durable as they get
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _free_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged user, as shutil.disk_usage reports) on the filesystem `path` is or will be on."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def checkpoint_bytes(path: str | Path) -> int:
    """What a checkpoint directory occupies on disk (allocated blocks where the filesystem reports them)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def state_dict_bytes(state: dict, world_size: int) -> int:
    """An upper estimate of a DCP checkpoint of `state` written by `world_size` ranks, from this rank's view:
    replicated or sharded entries once at their global size (a DTensor's numel is global), per-rank entries
    (`per_rank_keys()`) once per rank, plus DCP's per-entry overhead, a 5% margin and one block per file."""
    payload = entries = 0
    for obj in state.values():
        sd = obj.state_dict() if isinstance(obj, Stateful) else obj
        per_rank = set(getattr(obj, "per_rank_keys", lambda: [])())
        for key, value in (sd.items() if isinstance(sd, Mapping) else [(None, sd)]):
            n, k = _payload(value)
            times = world_size if key in per_rank else 1
            payload, entries = payload + n * times, entries + k * times
    return int(payload * PAYLOAD_MARGIN) + ENTRY_OVERHEAD * entries + BLOCK * (world_size + 1)


def _payload(value) -> tuple[int, int]:
    """(bytes, entries) of one state-dict value as DCP flattens it: mappings are walked, everything else is an entry."""
    if isinstance(value, Mapping):
        sums = [_payload(v) for v in value.values()]
        return sum(s[0] for s in sums), sum(s[1] for s in sums)
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size(), 1
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        sums = [_payload(v) for v in value]
        return sum(s[0] for s in sums), sum(s[1] for s in sums)
    if isinstance(value, (bytes, bytearray)):
        return len(value), 1
    try:
        return len(pickle.dumps(value)), 1
    except Exception:
        return 0, 1


def _says_no_space(error: BaseException) -> bool:
    """Whether ENOSPC appears anywhere in an exception, its causes, or (for DCP) any rank's failure."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "no space left" in str(e).lower():
            return True
        if isinstance(e, CheckpointException):
            todo += [exc for exc, _trace in e.failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


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
        plan = _on_rank0(lambda: self._prepare(state), f"prepare checkpoint {final}")
        if plan["free"] < plan["needed"]:
            raise CheckpointNoSpaceError(self.directory, step, plan["needed"], plan["free"], self.keep, plan["latest"])
        try:
            dcp.save(state, checkpoint_id=tmp)   # fsyncs each data file, then .metadata (FileSystemWriter sync_files)
        except BaseException as error:
            self._raise_if_out_of_space(error, step, tmp, plan)
            raise
        _fsync(tmp)   # the names of the files this rank wrote
        _barrier()
        _on_rank0(lambda: self._publish(final, tmp), f"publish checkpoint {final}")
        return final

    def _prepare(self, state: dict[str, Stateful]) -> dict:
        """Rank 0, before a save: remove stale partial saves, then estimate the checkpoint (the size of the previous
        complete one, else `state_dict_bytes`) and measure the free space; create the directory only if it fits."""
        for stale in self.directory.glob("*.tmp"):   # step_N.tmp/ or latest.tmp, left by a crash
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        previous = self._latest_name()
        if previous and (self.directory / previous / ".metadata").is_file():
            needed = checkpoint_bytes(self.directory / previous) + BLOCK
        else:
            needed = state_dict_bytes(state, _world())
        plan = {"needed": needed, "free": _free_bytes(self.directory), "latest": previous}
        if plan["free"] >= needed:
            self.directory.mkdir(parents=True, exist_ok=True)
        return plan

    def _latest_name(self) -> str | None:
        marker = self.directory / "latest"
        return marker.read_text().strip() if marker.is_file() else None

    def _raise_if_out_of_space(self, error: BaseException, step: int, tmp: Path, plan: dict) -> None:
        """After a failed dcp.save: if it ran out of space, remove the partial checkpoint and raise
        CheckpointNoSpaceError on every rank. DCP raises its CheckpointException on every rank alike (it gathers
        the ranks' failures and broadcasts them), so the ranks can still agree and clean up together."""
        from_dcp = isinstance(error, CheckpointException)
        if not (from_dcp or _world() == 1):
            return   # raised on this rank alone: the others' state is unknown, so no collective and no cleanup
        # torch.save's zip writer reports ENOSPC as "unexpected pos", and another rank's error arrives without its
        # cause: a filesystem left (nearly) full tells too
        full = _any_rank(_says_no_space(error) or (from_dcp and _free_bytes(self.directory) < FULL_BELOW))
        if not full:
            return
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        shutil.rmtree(tmp, ignore_errors=True)   # on a filesystem rank 0 does not share
        log.error("rank %d: checkpoint step %d ran out of space in %s; removed %s", _rank(), step, self.directory, tmp)
        raise CheckpointNoSpaceError(self.directory, step, plan["needed"], _free_bytes(self.directory), self.keep,
                                     plan["latest"], during_save=True) from error

    def _publish(self, final: Path, tmp: Path) -> None:
        """Rank 0, once every rank's files are durable: rename, fsync, point `latest` at it, fsync, prune."""
        if final.exists():   # the same step saved again (e.g. a resumed run that ends where it began)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(final)
        _fsync(self.directory)
        marker_tmp = self.directory / "latest.tmp"
        with open(marker_tmp, "w") as f:
            f.write(final.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker_tmp, self.directory / "latest")
        _fsync(self.directory)
        self._prune(keep_also=final)

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
    """A Stateful minus some top-level keys (per-rank entries a smaller world never saved, optional ones an older
    checkpoint lacks)."""

    def __init__(self, obj: Stateful, drop: set[str]):
        self.obj, self.drop = obj, drop

    def state_dict(self) -> dict:
        return {k: v for k, v in self.obj.state_dict().items() if k not in self.drop}

    def load_state_dict(self, state: dict) -> None:
        self.obj.load_state_dict(state)


def _without_unsaved(name: str, obj, saved) -> Stateful:
    """Per-rank entries (`per_rank_keys()`) may be absent after a world-size change, and `optional_keys()` from a
    checkpoint written before they existed; everything else must exist."""
    keys = [*getattr(obj, "per_rank_keys", lambda: [])(), *getattr(obj, "optional_keys", lambda: [])()]
    missing = {k for k in keys if not any(s == f"{name}.{k}" or s.startswith(f"{name}.{k}.") for s in saved)}
    return _Without(obj, missing) if missing else obj

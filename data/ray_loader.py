"""Ray Data loader over a FieldDataset: the ``ShardedLoader`` interface, fed by Ray read tasks.

Epoch ``e`` reads exactly the samples of ``plan.global_stream(e)`` (the plan's drop_last cut
or padding included) in ``plan.chunk_order(e)``, one Ray read task and block per
``chunks_per_block`` consecutive chunks of that order; each task opens the store itself and
reads each of its chunks once. With W == 1 that is a ``ZarrChunkDatasource`` dataset per
epoch, iterated directly. With W > 1 it is cut by ``streaming_split(W, equal=True)``, so
every rank gets ``samples_per_rank`` rows and no rank waits at a collective for a missing
batch. The split is made once: its SplitCoordinator actor re-runs the dataset at every
iteration, and block ``k`` of a run is chunk group ``k`` of the epoch that rank 0 posted to
the run's board actor just before (a new split per epoch would cost a process start each).

What is deterministic, given (seed, epoch, W, chunks_per_block):

* The samples of an epoch: ``plan.global_stream(e)`` as a multiset, over all ranks.
* Which rank gets which rows, in which order. Datasets run with ``preserve_order=True``, so
  blocks reach Ray's OutputSplitter in chunk order, and it gives each block to the split with
  the fewest rows so far (ties: the lowest rank), cutting blocks only to equalise the end: a
  function of the block sizes, not of timing (Ray 2.60 source; the tests check it). With
  W == 1 the order is ``plan.global_stream(e)`` itself. This is *not*
  ``plan.epoch_indices(e, rank)``: ranks get whole blocks in turn, and samples inside a chunk
  stay in store order (``ShardedLoader`` also shuffles within windows).

Progress is the plan's ``(epoch, cursor)``, the same on every rank (equal splits, lockstep
steps), advanced as each batch is handed over. Resuming at cursor ``c`` re-runs the epoch and
each rank drops the first ``c`` rows of its split: thanks to the deterministic assignment
this is exact mid-epoch (no sample twice, none lost) for the same W and ``chunks_per_block``,
at the cost of reading those rows again. With another W or ``chunks_per_block`` the cursor
maps as in ``ChunkShardPlan`` and only the count is exact.

Ranks in separate processes (torchrun ranks as separate Ray drivers, or Ray Train workers)
meet at the board, a named actor in namespace ``fieldtrain`` created by rank 0 and found by
the others with ``ray.get_actor``: rank 0 puts the W split iterators there once (they are
picklable handles to the coordinator, usable from any driver of the cluster), and each rank
takes its own. All ranks must iterate in lockstep (as training steps do). Cluster: an
initialised Ray (Ray Train worker, tests) is used as is; else ``ray_address`` or
``RAY_ADDRESS``; else W == 1 starts a private loopback cluster, and W > 1 has rank 0 start
one and send its address to the others over torch.distributed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from data.shards import ChunkShardPlan
from data.store import FieldDataset

if TYPE_CHECKING:  # torch is imported lazily: Ray read workers unpickle `_read_block` from this module
    import torch

__all__ = ["NAMESPACE", "RayShardedLoader", "ZarrChunkDatasource"]

logger = logging.getLogger("fieldtrain.data")

NAMESPACE = "fieldtrain"  # Ray namespace of the boards


def _chunk_groups(chunk_ids, chunks_per_block: int, indices, chunk_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group ``chunk_ids`` in runs of ``chunks_per_block`` (list order) and give each run the samples of
    ``indices`` that fall in its chunks, in ``indices`` order; every index must lie in one of the chunks."""
    chunk_ids, indices = np.asarray(chunk_ids, dtype=np.int64), np.asarray(indices, dtype=np.int64)
    cid = indices // chunk_size
    position = np.full(max(int(chunk_ids.max()), int(cid.max(initial=0))) + 1, -1, dtype=np.int64)
    position[chunk_ids] = np.arange(len(chunk_ids))
    pos = position[cid]
    if (pos < 0).any():
        i = int(indices[np.argmax(pos < 0)])
        raise ValueError(f"sample {i} lies in chunk {i // chunk_size}, which is not among chunk_ids")
    group = pos // chunks_per_block
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(math.ceil(len(chunk_ids) / chunks_per_block) + 1))
    return [(chunk_ids[g * chunks_per_block:(g + 1) * chunks_per_block], indices[order[lo:hi]])
            for g, (lo, hi) in enumerate(itertools.pairwise(bounds))]


def _read_block(url: str, storage_options: dict | None, chunks: np.ndarray, indices: np.ndarray) -> list[Block]:
    """Read task body: samples ``indices`` (global, in output order) from ``chunks``, each chunk read once."""
    ds = FieldDataset(url, storage_options)
    x = np.empty((len(indices), *ds.input_shape), dtype=np.float32)
    y = np.empty((len(indices), *ds.target_shape), dtype=np.float32)
    cid = indices // ds.chunk_size
    used = [c for c in chunks.tolist() if (cid == c).any()]
    # One concurrent fetch of the block's chunks; FieldDataset's errors name the URL, array and chunk.
    for c, (cx, cy) in zip(used, ds.read_chunks(used)):
        rows = np.flatnonzero(cid == c)
        src, dst = _as_slice(indices[rows] - c * ds.chunk_size), _as_slice(rows)
        x[dst], y[dst] = cx[src], cy[src]
    return [BlockAccessor.batch_to_block({"x": x, "y": y, "index": indices})]


def _row_bytes(ds: FieldDataset) -> int:
    return 4 * (math.prod(ds.input_shape) + math.prod(ds.target_shape)) + 8


def _as_slice(a: np.ndarray) -> slice | np.ndarray:
    """``a`` as a slice when it is a run of consecutive integers (the usual case: one copy, no gather)."""
    return slice(int(a[0]), int(a[-1]) + 1) if a[-1] - a[0] + 1 == len(a) and (np.diff(a) == 1).all() else a


class ZarrChunkDatasource(Datasource):
    """Ray datasource over chunks of a FieldDataset, ``chunks_per_block`` consecutive ids of
    ``chunk_ids`` per read task and block.

    Rows are columns ``x`` (C_in, *grid) and ``y`` (C_out, *grid) float32 plus ``index``
    (global sample index). ``indices`` selects the rows (default: every sample of the chunks,
    in ``chunk_ids`` order); each must lie in one of the chunks and may repeat. A block holds
    its chunks' selected rows in ``indices`` order; ``parallelism`` is ignored, the grouping
    is the block size (read with ``override_num_blocks=num_blocks`` so Ray does not re-split).
    """

    def __init__(
        self,
        url: str,
        chunk_ids,
        chunks_per_block: int = 4,
        storage_options: dict | None = None,
        indices=None,
    ) -> None:
        super().__init__()
        if chunks_per_block < 1:
            raise ValueError(f"ZarrChunkDatasource({url}): chunks_per_block must be >= 1, got {chunks_per_block}")
        ds = FieldDataset(url, storage_options)
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64).ravel()
        if len(chunk_ids) == 0:
            raise ValueError(f"ZarrChunkDatasource({url}): chunk_ids is empty")
        bad = chunk_ids[(chunk_ids < 0) | (chunk_ids >= ds.num_chunks)]
        if len(bad):
            raise ValueError(f"{url}: chunk {int(bad[0])} out of range; dataset has chunks 0..{ds.num_chunks - 1}")
        if len(np.unique(chunk_ids)) != len(chunk_ids):
            raise ValueError(f"ZarrChunkDatasource({url}): chunk_ids repeat a chunk; each is read once")
        csize = ds.chunk_size
        if indices is None:
            indices = np.concatenate([np.arange(c * csize, min((c + 1) * csize, ds.num_samples)) for c in chunk_ids])
        indices = np.asarray(indices, dtype=np.int64).ravel()
        bad = indices[(indices < 0) | (indices >= ds.num_samples)]
        if len(bad):
            raise ValueError(f"{url}: sample {int(bad[0])} out of range; dataset has {ds.num_samples} samples")
        try:
            groups = _chunk_groups(chunk_ids, chunks_per_block, indices, csize)
        except ValueError as e:
            raise ValueError(f"{url}: {e}") from None
        self.url, self.storage_options = url, storage_options
        self.groups = [(c, i) for c, i in groups if len(i)]  # a chunk with no selected row is never read
        self.num_rows = len(indices)
        self._row_bytes = _row_bytes(ds)

    @property
    def num_blocks(self) -> int:
        return len(self.groups)

    def estimate_inmemory_data_size(self) -> int:
        return self.num_rows * self._row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [
            ReadTask(functools.partial(_read_block, self.url, self.storage_options, chunks, idx),
                     BlockMetadata(num_rows=len(idx), size_bytes=len(idx) * self._row_bytes, input_files=None,
                                   exec_stats=None),
                     per_task_row_limit=per_task_row_limit)
            for chunks, idx in self.groups
        ]


@ray.remote(num_cpus=0)
class _Board:
    """Named actor of one W > 1 run: rank 0 puts the W split iterators (once) and, before every
    iteration, the chunk groups of the epoch; read tasks fetch their group from here."""

    def __init__(self, url: str, storage_options: dict | None) -> None:
        self._source = (url, storage_options)
        self._splits: list | None = None
        self._posted = asyncio.Event()
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []

    async def put_splits(self, splits: list) -> None:
        self._splits = splits
        self._posted.set()

    async def take_split(self, rank: int):
        await self._posted.wait()
        return self._splits[rank]

    async def set_groups(self, groups: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self._groups = groups

    async def group(self, k: int) -> tuple[str, dict | None, np.ndarray, np.ndarray]:
        return (*self._source, *self._groups[k])


def _read_posted_group(board_name: str, k: int) -> list[Block]:
    """Read task body of the W > 1 dataset: group ``k`` of the epoch rank 0 last posted to the board."""
    board = ray.get_actor(board_name, namespace=NAMESPACE)
    return _read_block(*ray.get(board.group.remote(k)))


class _PostedGroups(Datasource):
    """The W > 1 dataset, made once: ``len(sizes)`` read tasks, task ``k`` reading group ``k`` of the
    posted epoch (``sizes``: rows per group of one epoch, estimates for Ray; a group may differ by a few
    rows between epochs, or be empty, when the plan cuts or pads the stream)."""

    def __init__(self, board_name: str, sizes: list[int], row_bytes: int) -> None:
        super().__init__()
        self.board_name, self.sizes, self.row_bytes = board_name, sizes, row_bytes

    def estimate_inmemory_data_size(self) -> int:
        return sum(self.sizes) * self.row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [
            ReadTask(functools.partial(_read_posted_group, self.board_name, k),
                     BlockMetadata(num_rows=n, size_bytes=n * self.row_bytes, input_files=None, exec_stats=None),
                     per_task_row_limit=per_task_row_limit)
            for k, n in enumerate(self.sizes)
        ]


def _start_local_cluster() -> tuple[str, str | None]:
    """Start a one-node cluster on loopback; returns its address and the auth mode other drivers need."""
    # Ray starts workers at niceness 15; read tasks are on the training step's critical path, so not here.
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, _system_config={"worker_niceness": 0})
    # Ray >= 2.5x turns token auth on for a new local cluster (token in ~/.ray/auth_token) but a driver
    # joining it only uses the token when RAY_AUTH_MODE says so; otherwise it fails with "Failed to connect".
    return ray.get_runtime_context().gcs_address, os.environ.get("RAY_AUTH_MODE")


def _connect(address: str | None, rank: int, world_size: int) -> bool:
    """Connect this process to a Ray cluster (module docstring); True when this call did the ray.init."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return True
    if world_size == 1:
        _start_local_cluster()
        return True
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"RayShardedLoader: world_size={world_size} needs a shared Ray cluster: pass ray_address, "
                         "set RAY_ADDRESS, or initialise torch.distributed so rank 0 can start one")
    box: list[tuple[str, str | None] | None] = [None]
    if rank == 0:
        try:
            box[0] = _start_local_cluster()
        finally:  # broadcast even on failure, so the other ranks raise instead of hanging
            dist.broadcast_object_list(box, src=0)
    else:
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            raise ValueError("RayShardedLoader: rank 0 failed to start a Ray cluster")
        address, auth_mode = box[0]
        if auth_mode is not None and "RAY_AUTH_MODE" not in os.environ:
            os.environ["RAY_AUTH_MODE"] = auth_mode
            # Ray caches its config at import; re-read the environment as ray.init does for a new cluster.
            ray._raylet.Config.initialize("")
        ray.init(address=address)
    return True


def _default_group(url: str, seed: int, world_size: int) -> str:
    """A name the W ranks of one run agree on without talking: the torchrun run id or rendezvous address."""
    env = os.environ
    key = env.get("TORCHELASTIC_RUN_ID", "none")
    if key == "none":
        key = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}" if "MASTER_ADDR" in env and "MASTER_PORT" in env else ""
    return hashlib.sha1(f"{key}|{url}|{seed}|{world_size}".encode()).hexdigest()[:16]


class RayShardedLoader:
    """``ShardedLoader``'s interface over Ray Data: (x, y) float32 normalised torch batches of this
    rank's ``streaming_split`` share of each epoch (module docstring for the sharding semantics).

    ``plan`` gives W, the rank, the per-epoch chunk order and stream, and holds the progress.
    ``storage_options`` must be those ``dataset`` was opened with (read tasks reopen the store).
    ``chunks_per_block`` sets the block size, which sets the throughput (Ray pays per task:
    blocks of ~10 MB or more); each read task reserves ``read_cpus`` CPUs, at most
    ``read_concurrency`` run at once (default: the cluster's CPU count), and ``prefetch_batches``
    batches are prepared ahead of the consumer. ``group`` names the run on the cluster (default:
    from the torchrun environment); the ranks of a run must agree on it. A cluster started
    elsewhere should run ``RAY_worker_niceness=0`` (Ray starts workers at nice 15, so busy
    trainer processes would starve the reads). ``close()`` releases the Ray side and ends the
    loader.
    """

    def __init__(
        self,
        dataset: FieldDataset,
        plan: ChunkShardPlan,
        batch_size: int,
        *,
        storage_options: dict | None = None,
        prefetch_batches: int = 2,
        chunks_per_block: int = 4,
        read_cpus: float = 0.25,
        read_concurrency: int | None = None,
        ray_address: str | None = None,
        normalize: bool = True,
        drop_last_batch: bool = True,
        group: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        from data.loader import ChannelNormalizer, _np_affine

        if plan.chunk_size != dataset.chunk_size:
            raise ValueError(f"RayShardedLoader: plan chunk_size={plan.chunk_size} differs from the chunk length "
                             f"{dataset.chunk_size} of {dataset.url}")
        if plan.start + plan.num_samples > dataset.num_samples:
            raise ValueError(f"RayShardedLoader: plan covers samples [{plan.start}, {plan.start + plan.num_samples})"
                             f" but {dataset.url} holds {dataset.num_samples}")
        if (batch_size < 1 or prefetch_batches < 0 or chunks_per_block < 1 or not read_cpus > 0 or timeout_s <= 0
                or (read_concurrency is not None and read_concurrency < 1)):
            raise ValueError(f"RayShardedLoader: need batch_size >= 1, prefetch_batches >= 0, chunks_per_block >= 1, "
                             f"read_cpus > 0, read_concurrency >= 1 or None, timeout_s > 0; got {batch_size}, "
                             f"{prefetch_batches}, {chunks_per_block}, {read_cpus}, {read_concurrency}, {timeout_s}")
        if drop_last_batch and batch_size > plan.samples_per_rank:
            raise ValueError(f"RayShardedLoader: batch_size={batch_size} exceeds samples_per_rank="
                             f"{plan.samples_per_rank} with drop_last_batch=True, so no batch would ever be produced")
        self.dataset, self.plan = dataset, plan
        self.storage_options = storage_options
        self.batch_size, self.prefetch = int(batch_size), int(prefetch_batches)
        self.chunks_per_block, self.read_cpus = int(chunks_per_block), float(read_cpus)
        self.normalize, self.drop_last_batch = bool(normalize), bool(drop_last_batch)
        self.timeout_s = float(timeout_s)
        stats = dataset.normalization()
        self.input_normalizer = ChannelNormalizer.from_stats(stats["inputs"])
        self.target_normalizer = ChannelNormalizer.from_stats(stats["targets"])
        self._x_affine = _np_affine(self.input_normalizer, 1 + len(dataset.input_shape))
        self._y_affine = _np_affine(self.target_normalizer, 1 + len(dataset.target_shape))
        self.group = group or _default_group(dataset.url, plan.seed, plan.world_size)
        self._active: Iterator | None = None
        self._board = None  # W > 1: the run's _Board actor
        self._split = None  # W > 1: this rank's DataIterator, for every epoch
        self._closed = False
        self._owns_ray = _connect(ray_address, plan.rank, plan.world_size)
        # Ray keeps about one idle worker per CPU between epochs and kills the rest; more concurrent reads
        # than CPUs would start (and import zarr in) fresh worker processes every epoch.
        self.read_concurrency = read_concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
        if plan.world_size > 1:
            try:
                self._join_run()
            except BaseException:
                self.close()
                raise

    # ---- cluster side -----------------------------------------------------------------

    def _join_run(self) -> None:
        """W > 1: rank 0 creates the board and the split, the other ranks take their split from the board."""
        plan, name = self.plan, f"board-{self.group}"
        if plan.rank == 0:
            try:
                self._board = _Board.options(name=name, namespace=NAMESPACE).remote(self.dataset.url,
                                                                                  self.storage_options)
            except ValueError as e:
                raise ValueError(f"RayShardedLoader: board {NAMESPACE}/{name} already exists on the cluster; "
                                 "another run uses the same group (pass a distinct group=)") from e
            sizes = [len(i) for _, i in self._groups(plan.epoch)]
            source = _PostedGroups(name, sizes, _row_bytes(self.dataset))
            splits = self._configure(ray.data.read_datasource(
                source, override_num_blocks=len(sizes), num_cpus=self.read_cpus, concurrency=self.read_concurrency,
            )).streaming_split(plan.world_size, equal=True)
            ray.get(self._board.put_splits.remote(splits), timeout=self.timeout_s)
            self._split = splits[0]
            return
        deadline = time.monotonic() + self.timeout_s
        while self._board is None:
            try:
                self._board = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                if time.monotonic() > deadline:
                    raise ValueError(f"RayShardedLoader: rank {plan.rank} found no board {NAMESPACE}/{name} from "
                                     f"rank 0 within {self.timeout_s:.0f} s") from None
                time.sleep(0.1)
        try:
            self._split = ray.get(self._board.take_split.remote(plan.rank),
                                  timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise ValueError(f"RayShardedLoader: rank {plan.rank} got no split from rank 0 within "
                             f"{self.timeout_s:.0f} s") from None

    def _groups(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        plan = self.plan
        return _chunk_groups(plan.chunk_order(epoch), self.chunks_per_block, plan.global_stream(epoch),
                            plan.chunk_size)

    @staticmethod
    def _configure(ds: ray.data.Dataset) -> ray.data.Dataset:
        ds.context.execution_options.preserve_order = True  # makes the split assignment deterministic
        ds.context.enable_progress_bars = False
        return ds

    def epoch_dataset(self, epoch: int) -> ray.data.Dataset:
        """The Ray dataset of epoch ``epoch`` (all ranks' samples, in stream order); what W == 1 iterates."""
        plan = self.plan
        source = ZarrChunkDatasource(self.dataset.url, plan.chunk_order(epoch), self.chunks_per_block,
                                     self.storage_options, indices=plan.global_stream(epoch))
        return self._configure(ray.data.read_datasource(source, override_num_blocks=source.num_blocks,
                                                        num_cpus=self.read_cpus, concurrency=self.read_concurrency))

    def _source(self, epoch: int):
        """What this rank iterates for ``epoch``: the epoch's dataset (W == 1) or its split (W > 1)."""
        if self.plan.world_size == 1:
            return self.epoch_dataset(epoch)
        if self.plan.rank == 0:  # before this rank reaches the coordinator's barrier, so before any read
            ray.get(self._board.set_groups.remote(self._groups(epoch)), timeout=self.timeout_s)
        return self._split

    # ---- iteration --------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches in a full epoch."""
        from data.loader import epoch_batches   # lazily: read workers import this module but not torch
        return epoch_batches(self.plan, self.batch_size, self.drop_last_batch)[0]

    def _epoch_end(self) -> int:
        from data.loader import epoch_batches
        return epoch_batches(self.plan, self.batch_size, self.drop_last_batch)[1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch from the plan's cursor (a cursor in the dropped tail starts the next epoch)."""
        return self._start(with_index=False)

    def iter_with_index(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        """As ``__iter__``, also yielding each batch's global sample indices."""
        return self._start(with_index=True)

    def _start(self, with_index: bool) -> Iterator:
        if self._closed:
            raise ValueError(f"RayShardedLoader({self.dataset.url}): iterated after close()")
        self._stop()
        self._active = self._epoch(with_index)
        return self._active

    def _epoch(self, with_index: bool) -> Iterator:
        import torch

        plan, end = self.plan, self._epoch_end()
        if plan.cursor >= end:
            plan.set_epoch(plan.epoch + 1)
        epoch, skip = plan.epoch, plan.cursor
        batches = iter(self._source(epoch).iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                                        prefetch_batches=self.prefetch,
                                                        drop_last=self.drop_last_batch))
        pos = 0  # rows of this rank's split seen, including those skipped on resume
        try:
            for batch in batches:
                n = len(batch["index"])
                lo, pos = max(0, skip - pos), pos + n
                if lo >= n:
                    continue
                x, y, idx = batch["x"][lo:], batch["y"][lo:], batch["index"][lo:]
                if self.normalize:
                    x = (x - self._x_affine[0]) / self._x_affine[1]
                    y = (y - self._y_affine[0]) / self._y_affine[1]
                else:  # blocks come read-only from the object store
                    x, y = np.array(x), np.array(y)
                plan.advance(len(x))  # before the hand-off: state_dict() now points past this batch
                if plan.epoch == epoch and plan.cursor >= end:  # skip the dropped partial batch
                    plan.set_epoch(epoch + 1)
                out = (torch.from_numpy(x), torch.from_numpy(y))
                yield (*out, np.array(idx)) if with_index else out
            if plan.epoch == epoch:  # Ray's equal split should make this impossible
                raise RuntimeError(f"RayShardedLoader({self.dataset.url}): rank {plan.rank} got {pos} rows in epoch "
                                   f"{epoch}; expected {plan.samples_per_rank}")
        finally:
            batches.close()

    def _stop(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    def close(self) -> None:
        """Stop the epoch in progress and release the Ray side (board, and Ray itself if this loader started it)."""
        self._stop()
        if self._closed:
            return
        self._closed = True
        if self._board is not None and self.plan.rank == 0 and ray.is_initialized():
            ray.kill(self._board)
        self._board = self._split = None
        if self._owns_ray:
            ray.shutdown()

    # ---- progress ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {**self.plan.state_dict(), "chunks_per_block": self.chunks_per_block}

    def load_state_dict(self, state: dict) -> None:
        """Resume (module docstring): exact with the same world size and chunks_per_block."""
        self._stop()
        saved = state.get("chunks_per_block")
        if saved != self.chunks_per_block and state.get("cursor", 0):
            logger.warning("RayShardedLoader: resuming mid-epoch with chunks_per_block %s (checkpoint: %s); the "
                           "sample count of epoch %s is kept but not which samples were already seen",
                           self.chunks_per_block, saved, state.get("epoch"))
        self.plan.load_state_dict(state)

    def evaluation_batches(self, start: int, stop: int, batch_size: int | None = None):
        """``data.loader.evaluation_batches`` over this loader's dataset (read directly, no Ray)."""
        from data.loader import evaluation_batches

        return evaluation_batches(self.dataset, start, stop, batch_size or self.batch_size, self.normalize)

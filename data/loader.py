"""Prefetching, normalising batch loader over one rank's chunk-aligned shard.

The plan (``data.shards.ChunkShardPlan``) fixes which samples a rank sees and in which
order; this module turns that order into float32 torch batches. A background thread walks
the rank's epoch order one shuffle window (``window_chunks * C`` samples) at a time,
reads the chunks the window needs (each chunk once: a chunk spans at most two windows
and a small LRU keeps the boundary chunk), gathers and normalises the window's samples
and cuts them into batches, which wait in a bounded queue ``prefetch`` batches deep.

Progress lives in the plan: a batch advances ``plan.cursor`` the moment it is handed to
the caller, so ``state_dict()`` taken between batches resumes on exactly the next sample.
Batch boundaries are multiples of ``batch_size`` from the epoch start (a cursor in the
middle of a batch, possible only after a world-size change, first yields the rest of
that batch); with ``drop_last_batch`` the partial tail is skipped and the plan moves to
the next epoch together with the last full batch.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from data.shards import ChunkShardPlan
from data.store import FieldDataset

__all__ = ["ChannelNormalizer", "ShardedLoader", "evaluation_batches"]

logger = logging.getLogger("fieldtrain.data")


class ChannelNormalizer(torch.nn.Module):
    """Per-channel standardisation of (B, C, *grid) tensors: ``(x - mean_c) / (std_c + eps)``.

    ``eps`` keeps constant channels (std 0) finite. Statistics are buffers, so they follow
    ``.to(device)`` and land in a model's ``state_dict``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], eps: float = 1e-6) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if mean_t.ndim != 1 or std_t.shape != mean_t.shape or len(mean_t) == 0:
            raise ValueError(
                f"ChannelNormalizer: mean and std must be equal-length 1-D sequences, one entry per channel; "
                f"got shapes {tuple(mean_t.shape)} and {tuple(std_t.shape)}"
            )
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all() and (std_t >= 0).all()):
            raise ValueError(f"ChannelNormalizer: need finite mean and finite std >= 0; got mean={mean!r}, std={std!r}")
        if eps <= 0:
            raise ValueError(f"ChannelNormalizer: eps must be > 0, got {eps}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.eps = float(eps)

    @classmethod
    def from_stats(cls, stats: dict, eps: float = 1e-6) -> ChannelNormalizer:
        """Build from ``{"mean": [...], "std": [...]}`` as stored by ``FieldDataset.normalization()``."""
        if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
            raise ValueError(f"ChannelNormalizer.from_stats: need a dict with keys 'mean' and 'std'; got {stats!r}")
        return cls(stats["mean"], stats["std"], eps)

    @property
    def num_channels(self) -> int:
        return len(self.mean)

    def _stats_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"ChannelNormalizer: expected (batch, {self.num_channels}, *grid); got shape {tuple(x.shape)}"
            )
        shape = (1, self.num_channels) + (1,) * (x.ndim - 2)
        mean = self.mean.to(dtype=x.dtype, device=x.device).view(shape)
        scale = (self.std.to(dtype=x.dtype, device=x.device) + self.eps).view(shape)
        return mean, scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        mean, scale = self._stats_for(x)
        return (x - mean) / scale

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        mean, scale = self._stats_for(x)
        return x * scale + mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


def _np_affine(norm: ChannelNormalizer, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std + eps) as float32 numpy arrays broadcastable over (n, C, *grid); for the reader thread."""
    shape = (1, norm.num_channels) + (1,) * (ndim - 2)
    mean = norm.mean.detach().cpu().numpy().astype(np.float32).reshape(shape)
    scale = (norm.std.detach().cpu().numpy().astype(np.float32) + np.float32(norm.eps)).reshape(shape)
    return mean, scale


def _take(pending: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove and return the first ``k`` samples of a FIFO of (x, y) pieces."""
    xs, ys, got = [], [], 0
    while got < k:
        x, y = pending[0]
        need = k - got
        if len(x) <= need:
            pending.pop(0)
        else:
            pending[0] = (x[need:], y[need:])
            x, y = x[:need], y[:need]
        xs.append(x)
        ys.append(y)
        got += len(x)
    if len(xs) == 1:
        return xs[0], ys[0]
    return np.concatenate(xs), np.concatenate(ys)


class _ChunkCache:
    """Small LRU of decoded chunks with a one-window read-ahead: while the reader gathers window k, a
    helper thread fetches the chunks of window k+1 (decoding releases the GIL), so reads overlap work."""

    def __init__(self, dataset: FieldDataset, capacity: int) -> None:
        self.dataset, self.capacity = dataset, capacity
        self._chunks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fieldtrain-readahead")
        self._ahead: tuple[list[int], Future] | None = None

    def _insert(self, chunks: list[int], data: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self._chunks.update(zip(chunks, data))
        while len(self._chunks) > self.capacity:
            self._chunks.popitem(last=False)

    def get_many(self, chunks: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Chunks in the order given (also their recency order); misses not read ahead are read now."""
        assert 2 * len(chunks) <= self.capacity
        if self._ahead is not None:
            ahead, future = self._ahead
            self._ahead = None
            self._insert(ahead, future.result())
        missing = [c for c in chunks if c not in self._chunks]
        if missing:
            self._insert(missing, self.dataset.read_chunks(missing))
        for c in chunks:
            self._chunks.move_to_end(c)
        return [self._chunks[c] for c in chunks]

    def read_ahead(self, chunks: list[int]) -> None:
        """Start reading the chunks of the next window that are not cached."""
        assert self._ahead is None
        missing = [c for c in chunks if c not in self._chunks]
        if missing:
            self._ahead = (missing, self._pool.submit(self.dataset.read_chunks, missing))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_DONE, _BATCH, _ERROR = "done", "batch", "error"


class _Reader(threading.Thread):
    """Produces one epoch's batches (from ``cursor`` to ``end`` of ``indices``) into a bounded queue."""

    def __init__(self, loader: ShardedLoader, epoch: int, cursor: int, end: int) -> None:
        super().__init__(name=f"fieldtrain-loader-{loader.dataset.url}-r{loader.plan.rank}", daemon=True)
        self.loader, self.epoch, self.cursor, self.end = loader, epoch, cursor, end
        self.queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self.stop_event = threading.Event()

    def _put(self, item: tuple) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            self._produce()
            self._put((_DONE, None))
        except BaseException as e:  # surfaces in the consumer, see ShardedLoader.__iter__
            self._put((_ERROR, e))

    def _window_chunks(self, idx: np.ndarray, stream_rank: np.ndarray) -> list[int]:
        """The chunks samples ``idx`` live in, in stream order (so the window's last chunk, shared with the
        next window, is the most recently used)."""
        chunks = np.unique(idx // self.loader.plan.chunk_size)
        return chunks[np.argsort(stream_rank[chunks - self.loader.plan.chunk_ids[0]])].tolist()

    def _gather(self, idx: np.ndarray, chunks: list[int], data: list[tuple[np.ndarray, np.ndarray]]
                ) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``idx`` (global indices) from the decoded ``chunks`` as normalised float32 arrays."""
        ld = self.loader
        csize = ld.plan.chunk_size
        cid = idx // csize
        x = np.empty((len(idx), *ld.dataset.input_shape), dtype=np.float32)
        y = np.empty((len(idx), *ld.dataset.target_shape), dtype=np.float32)
        for c, (cx, cy) in zip(chunks, data):
            sel = cid == c
            local = idx[sel] - c * csize
            x[sel] = cx[local]
            y[sel] = cy[local]
        if ld.normalize:
            x -= ld._x_affine[0]
            x /= ld._x_affine[1]
            y -= ld._y_affine[0]
            y /= ld._y_affine[1]
        return x, y

    def _produce(self) -> None:
        ld, plan = self.loader, self.loader.plan
        window, end = plan.window_samples, self.end
        indices = plan.epoch_indices(self.epoch)
        order = plan.chunk_order(self.epoch)
        stream_rank = np.empty(len(order), dtype=np.int64)  # position of each plan chunk in the stream
        stream_rank[order - plan.chunk_ids[0]] = np.arange(len(order))
        spans = [(max(lo, self.cursor), min(lo + window, end))
                 for lo in range((self.cursor // window) * window, end, window)]
        chunks = [self._window_chunks(indices[a:b], stream_rank) for a, b in spans]
        # A window of w*C samples touches <= w+1 chunks (+1 partial); room for this window and the next
        # one read ahead, and the boundary chunk survives to the next window.
        cache = _ChunkCache(ld.dataset, capacity=2 * (plan.window_chunks + 2))
        try:
            self._batches(indices, spans, chunks, cache)
        finally:
            cache.close()

    def _batches(self, indices: np.ndarray, spans: list[tuple[int, int]], chunks: list[list[int]],
                 cache: _ChunkCache) -> None:
        batch, end = self.loader.batch_size, self.end
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        pos, n_pending = self.cursor, 0  # epoch position of pending[0]'s first sample
        for w, (a, b) in enumerate(spans):
            try:
                data = cache.get_many(chunks[w])
            except Exception as e:
                e.add_note(f"ShardedLoader: reading chunks {chunks[w]} of {self.loader.dataset.url} "
                           f"(rank {self.loader.plan.rank}, epoch {self.epoch})")
                raise
            if w + 1 < len(spans):
                cache.read_ahead(chunks[w + 1])
            pending.append(self._gather(indices[a:b], chunks[w], data))
            n_pending += b - a
            while n_pending and pos + n_pending >= min((pos // batch + 1) * batch, end):
                k = min((pos // batch + 1) * batch, end) - pos
                x, y = _take(pending, k)
                if not self._put((_BATCH, (torch.from_numpy(x), torch.from_numpy(y)))):
                    return
                pos, n_pending = pos + k, n_pending - k
            if self.stop_event.is_set():
                return

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        try:  # unblock a pending put and drop batches nobody will read
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        if self is not threading.current_thread():
            self.join(timeout)
            if self.is_alive():
                logger.warning("ShardedLoader: reader thread %s still busy after %.0f s", self.name, timeout)


def epoch_batches(plan: ChunkShardPlan, batch_size: int, drop_last_batch: bool) -> tuple[int, int]:
    """(batches in a full epoch, samples they cover) for one rank of `plan`; shared by both loaders."""
    per_rank = plan.samples_per_rank
    if drop_last_batch:
        return per_rank // batch_size, (per_rank // batch_size) * batch_size
    return math.ceil(per_rank / batch_size), per_rank


class ShardedLoader:
    """Iterates (x, y) float32 torch batches of one rank's shard, normalised with the store's stats.

    A background thread reads the chunks each window needs (every chunk read once per window,
    a small LRU cache so a boundary chunk is not read twice) and fills a bounded queue
    ``prefetch`` batches deep. ``input_normalizer``/``target_normalizer`` always hold the
    store's statistics (for decoding predictions), ``normalize=False`` only skips applying them.
    """

    def __init__(
        self,
        dataset: FieldDataset,
        plan: ChunkShardPlan,
        batch_size: int,
        prefetch: int = 4,
        normalize: bool = True,
        drop_last_batch: bool = True,
    ) -> None:
        if plan.chunk_size != dataset.chunk_size:
            raise ValueError(
                f"ShardedLoader: plan chunk_size={plan.chunk_size} differs from the chunk length "
                f"{dataset.chunk_size} of {dataset.url}"
            )
        if plan.start + plan.num_samples > dataset.num_samples:
            raise ValueError(
                f"ShardedLoader: plan covers samples [{plan.start}, {plan.start + plan.num_samples}) but "
                f"{dataset.url} holds {dataset.num_samples}"
            )
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"ShardedLoader: batch_size and prefetch must be >= 1; got {batch_size}, {prefetch}")
        if drop_last_batch and batch_size > plan.samples_per_rank:
            raise ValueError(
                f"ShardedLoader: batch_size={batch_size} exceeds samples_per_rank={plan.samples_per_rank} with "
                "drop_last_batch=True, so no batch would ever be produced"
            )
        self.dataset, self.plan = dataset, plan
        self.batch_size, self.prefetch = int(batch_size), int(prefetch)
        self.normalize, self.drop_last_batch = bool(normalize), bool(drop_last_batch)
        stats = dataset.normalization()
        self.input_normalizer = ChannelNormalizer.from_stats(stats["inputs"])
        self.target_normalizer = ChannelNormalizer.from_stats(stats["targets"])
        self._x_affine = _np_affine(self.input_normalizer, 1 + len(dataset.input_shape))
        self._y_affine = _np_affine(self.target_normalizer, 1 + len(dataset.target_shape))
        self._reader: _Reader | None = None

    def __len__(self) -> int:
        """Batches in a full epoch."""
        return epoch_batches(self.plan, self.batch_size, self.drop_last_batch)[0]

    def _epoch_end(self) -> int:
        return epoch_batches(self.plan, self.batch_size, self.drop_last_batch)[1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch from the plan's cursor (a cursor in the dropped tail starts the next epoch)."""
        self.close()
        plan, end = self.plan, self._epoch_end()
        if plan.cursor >= end:
            plan.set_epoch(plan.epoch + 1)
        epoch = plan.epoch
        reader = _Reader(self, epoch, plan.cursor, end)
        self._reader = reader
        reader.start()
        try:
            while True:
                kind, payload = reader.queue.get()
                if kind == _DONE:
                    return
                if kind == _ERROR:
                    raise payload
                x, y = payload
                plan.advance(len(x))  # before the hand-off: state_dict() now points past this batch
                if plan.epoch == epoch and plan.cursor >= end:  # skip the dropped partial batch
                    plan.set_epoch(epoch + 1)
                yield x, y
        finally:
            reader.stop()
            if self._reader is reader:
                self._reader = None

    def close(self) -> None:
        """Stop the reader thread (safe to call any time, also mid-epoch)."""
        if self._reader is not None:
            self._reader.stop()
            self._reader = None

    def state_dict(self) -> dict:
        return self.plan.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.plan.load_state_dict(state)


def evaluation_batches(
    dataset: FieldDataset, start: int, stop: int, batch_size: int, normalize: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All samples [start, stop) in store order as (x, y) float32 batches; the last one may be partial.

    Reads chunk by chunk (each decoded once) and normalises with the store's statistics.
    """
    if not 0 <= start < stop <= dataset.num_samples:
        raise ValueError(
            f"evaluation_batches: range [{start}, {stop}) invalid for {dataset.url}; need "
            f"0 <= start < stop <= {dataset.num_samples}"
        )
    if batch_size < 1:
        raise ValueError(f"evaluation_batches: batch_size must be >= 1, got {batch_size}")
    stats = dataset.normalization()
    x_aff = _np_affine(ChannelNormalizer.from_stats(stats["inputs"]), 1 + len(dataset.input_shape))
    y_aff = _np_affine(ChannelNormalizer.from_stats(stats["targets"]), 1 + len(dataset.target_shape))
    csize = dataset.chunk_size
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    n_pending = 0
    for c in range(start // csize, (stop - 1) // csize + 1):
        x, y = dataset.read(max(c * csize, start), min((c + 1) * csize, stop))
        if normalize:
            x = (x - x_aff[0]) / x_aff[1]
            y = (y - y_aff[0]) / y_aff[1]
        pending.append((x, y))
        n_pending += len(x)
        while n_pending >= batch_size or (n_pending and c == (stop - 1) // csize):
            k = min(batch_size, n_pending)
            bx, by = _take(pending, k)
            n_pending -= k
            yield torch.from_numpy(np.ascontiguousarray(bx)), torch.from_numpy(np.ascontiguousarray(by))

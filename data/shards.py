"""Chunk-aligned sharding of a sample range across data-parallel ranks.

A Zarr store is read one chunk (``C`` consecutive samples) at a time, so the plan
shuffles *chunks* globally and *samples* only locally: every rank then reads a
contiguous run of chunks, each of them once per epoch.

Semantics of ``ChunkShardPlan(num_samples=n, chunk_size=C, world_size=W, ...)``:

* The plan covers the global store samples ``[start, start + n)`` (a train split is a
  prefix of whole chunks, the test split the rest). Chunks are the store's chunks,
  ``k`` covering ``[k*C, (k+1)*C)`` clipped to the range, so the first and last chunk
  may be partial.
* Epoch ``e``: the chunks are permuted by ``np.random.default_rng([seed, e])``; the
  permuted chunks' samples, each chunk in ascending order, form one stream of ``n``
  samples. Rank ``r`` gets the contiguous slice ``[r*L, (r+1)*L)`` of the stream,
  ``L = samples_per_rank``. A rank therefore touches one contiguous run of the
  permuted chunks, at most ``ceil(L/C) + 1`` of them (one more when a partial chunk
  lies inside the run); only the two boundary chunks are shared with neighbours.
* Equal counts per rank: ``drop_last=True`` -> ``L = n // W`` and the last ``n % W``
  samples of the epoch's stream are dropped (different ones each epoch, since the
  stream is permuted); ``drop_last=False`` -> ``L = ceil(n / W)`` and the stream is
  padded by repeating its first samples, as ``torch.utils.data.DistributedSampler``.
* Inside a rank's slice, order is shuffled within windows of ``window_chunks * C``
  consecutive samples, window ``w`` by ``np.random.default_rng([seed, e, r, w])``: a
  batch mixes a few chunks while a loader holds only a few chunks in memory.
  ``shuffle=False`` disables both permutations (samples in store order).
* The plan is a pure function of ``(n, C, start, W, seed, epoch)`` (plus the flags),
  so every rank builds the same one without communication.

Progress is ``(epoch, cursor)``: ``cursor`` samples of the rank's epoch order have been
consumed. Resuming with the same world size is exact. Resuming with a different world
size (elastic training) keeps the epoch (whose global stream is unchanged) and maps the
position: the ``P = cursor * W_old`` positions consumed globally become the new cursor
``c' = floor(P / W_new)``, rolling to the next epoch when that reaches the new ``L'``.
For the rest of that epoch the plan is *resharded*: the samples no old rank consumed
(old rank 0's remainder, then old rank 1's, ...) are cut into ``W_new`` consecutive runs
of ``L' - c'`` samples, one per new rank, placed at positions ``[c', L')`` of its order.
No sample of the epoch is repeated or skipped when ``W_new`` divides ``P`` and
``W_old * L == W_new * L'`` (e.g. 2 -> 4 or 2 -> 1 ranks with an even split); otherwise
the few samples that do not fit are dropped, or the first ones repeated, and that is
logged. Each change is remembered in ``reshards`` (``"W:cursor,..."``, saved with the
state) until the epoch ends, so a resharded epoch resumes exactly and may be resharded
again; the following epochs are the plain plan of the new world size.
"""

from __future__ import annotations

import logging
import math

import numpy as np

__all__ = ["ChunkShardPlan"]

logger = logging.getLogger("fieldtrain.data")

# Fields that must match between a checkpoint and the plan it is loaded into.
_FIXED_FIELDS = ("num_samples", "chunk_size", "seed", "start", "shuffle", "drop_last", "window_chunks")


class ChunkShardPlan:
    """Per-epoch, per-rank sample order over chunk-aligned shards (see module docstring)."""

    def __init__(
        self,
        num_samples: int,
        chunk_size: int,
        world_size: int,
        rank: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        window_chunks: int = 4,
        start: int = 0,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"ChunkShardPlan: world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ChunkShardPlan: rank must be in [0, {world_size}), got {rank}")
        if chunk_size < 1:
            raise ValueError(f"ChunkShardPlan: chunk_size must be >= 1, got {chunk_size}")
        if num_samples < world_size:
            raise ValueError(
                f"ChunkShardPlan: num_samples={num_samples} is fewer than world_size={world_size}; "
                "every rank needs at least one sample"
            )
        if window_chunks < 1:
            raise ValueError(f"ChunkShardPlan: window_chunks must be >= 1, got {window_chunks}")
        if start < 0:
            raise ValueError(f"ChunkShardPlan: start must be >= 0, got {start}")
        if seed < 0:
            raise ValueError(f"ChunkShardPlan: seed must be >= 0 (numpy SeedSequence), got {seed}")
        self.num_samples = int(num_samples)
        self.chunk_size = int(chunk_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.window_chunks = int(window_chunks)
        self.start = int(start)
        n, w = self.num_samples, self.world_size
        self.samples_per_rank: int = n // w if self.drop_last else math.ceil(n / w)
        self.window_samples: int = self.window_chunks * self.chunk_size
        # Store chunks overlapping [start, start + n), clipped to the range.
        first, last = self.start // self.chunk_size, (self.start + n - 1) // self.chunk_size
        self.chunk_ids = np.arange(first, last + 1, dtype=np.int64)
        self._chunk_lo = np.maximum(self.chunk_ids * self.chunk_size, self.start)
        self._chunk_len = np.minimum((self.chunk_ids + 1) * self.chunk_size, self.start + n) - self._chunk_lo
        self.epoch: int = 0
        self.cursor: int = 0
        self.reshards: list[tuple[int, int]] = []  # (world size, cursor) of each earlier world this epoch
        self._resharded: tuple[tuple, list[np.ndarray]] | None = None  # cache: (key, per-rank orders)

    @property
    def num_chunks(self) -> int:
        """Number of (possibly partial) store chunks the plan covers."""
        return len(self.chunk_ids)

    def chunk_order(self, epoch: int) -> np.ndarray:
        """Global store chunk ids in the order they form epoch ``epoch``'s stream."""
        if epoch < 0:
            raise ValueError(f"ChunkShardPlan: epoch must be >= 0, got {epoch}")
        if not self.shuffle:
            return self.chunk_ids.copy()
        return self.chunk_ids[np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)]

    def _per_rank(self, world: int) -> int:
        return self.num_samples // world if self.drop_last else math.ceil(self.num_samples / world)

    def global_stream(self, epoch: int, world: int | None = None) -> np.ndarray:
        """All ``world * samples_per_rank`` global indices of the epoch, before rank slicing (default world:
        this plan's)."""
        world = self.world_size if world is None else world
        order = self.chunk_order(epoch) - self.chunk_ids[0]
        lo, lens = self._chunk_lo[order], self._chunk_len[order]
        offsets = np.cumsum(lens) - lens  # stream position of each permuted chunk's first sample
        stream = np.arange(self.num_samples, dtype=np.int64) + np.repeat(lo - offsets, lens)
        total = world * self._per_rank(world)
        if total < self.num_samples:  # drop_last: cut the tail
            stream = stream[:total]
        elif total > self.num_samples:  # pad with the first samples (pad < world_size <= n)
            stream = np.concatenate([stream, stream[: total - self.num_samples]])
        return stream

    def epoch_indices(self, epoch: int, rank: int | None = None) -> np.ndarray:
        """Global sample indices (int64) that ``rank`` (default: this plan's) visits in ``epoch``, in order."""
        rank = self.rank if rank is None else rank
        if not 0 <= rank < self.world_size:
            raise ValueError(f"ChunkShardPlan: rank must be in [0, {self.world_size}), got {rank}")
        if self.reshards and epoch == self.epoch:
            return self._resharded_orders()[rank].copy()
        return self._plain_indices(epoch, rank, self.world_size)

    def _plain_indices(self, epoch: int, rank: int, world: int) -> np.ndarray:
        """Rank ``rank``'s order of ``epoch`` in the plain (never resharded) plan for ``world`` ranks."""
        per_rank = self._per_rank(world)
        out = self.global_stream(epoch, world)[rank * per_rank : (rank + 1) * per_rank].copy()
        if self.shuffle:
            ws = self.window_samples
            for win, lo in enumerate(range(0, per_rank, ws)):
                seg = out[lo : lo + ws]
                out[lo : lo + ws] = seg[np.random.default_rng([self.seed, epoch, rank, win]).permutation(len(seg))]
        return out

    def _resharded_orders(self) -> list[np.ndarray]:
        """Every rank's order of the current epoch after the world-size changes in ``reshards`` (module
        docstring): positions before the cursor hold consumed samples, the rest the unconsumed ones."""
        key = (self.epoch, tuple(self.reshards), self.world_size)
        if self._resharded is not None and self._resharded[0] == key:
            return self._resharded[1]
        w0 = self.reshards[0][0]
        orders = [self._plain_indices(self.epoch, r, w0) for r in range(w0)]
        worlds = [w for w, _ in self.reshards[1:]] + [self.world_size]
        for (old_w, cursor), new_w in zip(self.reshards, worlds):
            assert len(orders) == old_w, (len(orders), old_w)
            per_rank, new_cursor = self._per_rank(new_w), cursor * old_w // new_w
            assert new_cursor < per_rank, "a change that lands past the epoch's end starts the next epoch"
            done = np.concatenate([o[:cursor] for o in orders])
            todo = np.concatenate([o[cursor:] for o in orders])
            slots = new_w * (per_rank - new_cursor)
            if len(todo) != slots:
                logger.warning("ChunkShardPlan: resharding epoch %d from %d to %d ranks: %d unconsumed samples for "
                               "%d places; %s", self.epoch, old_w, new_w, len(todo), slots,
                               f"the last {len(todo) - slots} are skipped" if len(todo) > slots else
                               f"the first {slots - len(todo)} are repeated")
            todo = np.resize(todo, slots)   # cuts, or repeats from the start
            done = np.resize(done, new_w * new_cursor) if len(done) else np.zeros(new_w * new_cursor, np.int64)
            run = per_rank - new_cursor
            orders = [np.concatenate([done[r * new_cursor:(r + 1) * new_cursor], todo[r * run:(r + 1) * run]])
                      for r in range(new_w)]
        self._resharded = (key, orders)
        return orders

    # ---- progress -------------------------------------------------------------------

    def advance(self, n: int) -> None:
        """Mark ``n`` more samples of the current epoch consumed; rolls to the next epoch at its end."""
        if n < 0 or self.cursor + n > self.samples_per_rank:
            raise ValueError(
                f"ChunkShardPlan.advance: n={n} with cursor={self.cursor} must stay within "
                f"[0, samples_per_rank={self.samples_per_rank}]"
            )
        self.cursor += int(n)
        if self.cursor == self.samples_per_rank:
            self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``."""
        if epoch < 0:
            raise ValueError(f"ChunkShardPlan: epoch must be >= 0, got {epoch}")
        self.epoch, self.cursor = int(epoch), 0
        self.reshards = []

    def remaining_indices(self) -> np.ndarray:
        """Samples of the current epoch not consumed yet, in order."""
        return self.epoch_indices(self.epoch)[self.cursor :]

    def state_dict(self) -> dict:
        """Everything needed to resume; plain Python types (checkpoint-friendly)."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "chunk_size": self.chunk_size,
            "world_size": self.world_size,
            "start": self.start,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "window_chunks": self.window_chunks,
            "reshards": ",".join(f"{w}:{c}" for w, c in self.reshards),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()`` output, possibly saved with another world size (module docstring)."""
        missing = [k for k in ("epoch", "cursor", "world_size", *_FIXED_FIELDS) if k not in state]
        if missing:
            raise ValueError(f"ChunkShardPlan.load_state_dict: state is missing keys {missing}")
        for key in _FIXED_FIELDS:
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"ChunkShardPlan.load_state_dict: {key} differs: checkpoint has {state[key]!r}, "
                    f"this plan has {getattr(self, key)!r}"
                )
        epoch, cursor, old_world = int(state["epoch"]), int(state["cursor"]), int(state["world_size"])
        if epoch < 0 or cursor < 0 or old_world < 1:
            raise ValueError(
                f"ChunkShardPlan.load_state_dict: need epoch >= 0, cursor >= 0, world_size >= 1; "
                f"got epoch={epoch}, cursor={cursor}, world_size={old_world}"
            )
        try:
            reshards = [(int(w), int(c)) for w, c in
                        (item.split(":") for item in str(state.get("reshards", "")).split(",") if item)]
        except ValueError:
            raise ValueError(f"ChunkShardPlan.load_state_dict: reshards={state['reshards']!r} is not 'W:cursor,...'") \
                from None
        if old_world != self.world_size:
            consumed = cursor * old_world
            new_cursor = consumed // self.world_size
            if new_cursor >= self.samples_per_rank:
                epoch, new_cursor, reshards = epoch + 1, 0, []
            elif cursor > 0 or reshards:
                reshards = reshards + [(old_world, cursor)]
            logger.info(
                "ChunkShardPlan: world size changed %d -> %d; %d samples of epoch %d consumed globally, "
                "resuming at epoch %d cursor %d%s",
                old_world, self.world_size, consumed, int(state["epoch"]), epoch, new_cursor,
                "" if consumed % self.world_size == 0 else " (rounded down)",
            )
            cursor = new_cursor
        elif cursor > self.samples_per_rank:
            raise ValueError(
                f"ChunkShardPlan.load_state_dict: cursor={cursor} exceeds samples_per_rank={self.samples_per_rank}"
            )
        self.epoch, self.cursor, self.reshards = epoch, cursor, reshards
        if self.cursor == self.samples_per_rank:
            self.set_epoch(self.epoch + 1)

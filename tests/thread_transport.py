"""W ranks simulated by W threads in one process, for testing compressors without torch.distributed.

    group = ThreadGroup(4)
    outs = run_ranks(4, lambda rank, transport: compressor_for(transport).exchange(...))

Each collective has exactly the `Transport` semantics (sums, never averages): every rank drops its
input into a shared slot, waits at a barrier, reads what it needs, and waits at a second barrier so no
rank can overwrite a slot before everyone has read it. Sums run in rank order 0..W-1, so every rank
gets the bit-identical result a real allreduce gives.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable

import torch


class ThreadGroup:
    """Shared slots and a barrier for `world_size` threads; `transport(rank)` is rank's Transport."""

    def __init__(self, world_size: int, timeout_s: float = 60.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout_s)
        self.slots: list[Any] = [None] * world_size
        self.calls: list[list[tuple[str, tuple, torch.dtype]]] = [[] for _ in range(world_size)]

    def transport(self, rank: int) -> "ThreadTransport":
        return ThreadTransport(self, rank)

    def _exchange(self, rank: int, op: str, t: torch.Tensor, read: Callable[[list], Any]) -> Any:
        """Post `t`, check every rank called the same collective on the same shape, return read(slots)."""
        self.calls[rank].append((op, tuple(t.shape), t.dtype))
        self.slots[rank] = (op, t.detach().clone())
        self.barrier.wait()
        ops = {(o, tuple(x.shape), x.dtype) for o, x in self.slots}
        assert len(ops) == 1, f"ranks disagree on the collective: {sorted(map(str, ops))}"
        out = read([x for _, x in self.slots])
        self.barrier.wait()
        return out


class ThreadTransport:
    """One rank's view of a ThreadGroup: the `Transport` protocol of trainer/compress/base.py."""

    name = "thread"

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    @property
    def payload_bytes(self) -> int:
        """Bytes this rank has passed into collectives so far (what `auto`'s cost model predicts per collective)."""
        return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.group.calls[self.rank])

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        def total(xs):
            acc = xs[0].clone()
            for x in xs[1:]:
                acc += x
            return acc
        return t.copy_(self.group._exchange(self.rank, "allreduce", t, total))

    def allgather(self, t: torch.Tensor) -> torch.Tensor:
        return self.group._exchange(self.rank, "allgather", t, torch.stack)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        assert t.shape[0] == self.world_size, f"all_to_all wants (world, m) rows, got {tuple(t.shape)}"
        return self.group._exchange(self.rank, "all_to_all", t, lambda xs: torch.stack([x[self.rank] for x in xs]))

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t.copy_(self.group._exchange(self.rank, f"broadcast{src}", t, lambda xs: xs[src]))

    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        assert t.dim() == 2 and t.shape[0] == self.world_size, \
            f"reduce_scatter wants (world, m) rows, got {tuple(t.shape)}"

        def total(xs):
            acc = xs[0][self.rank].clone()
            for x in xs[1:]:
                acc += x[self.rank]
            return acc
        return self.group._exchange(self.rank, "reduce_scatter", t, total)


def run_ranks(world: int, fn: Callable[[int, ThreadTransport], Any], group: ThreadGroup | None = None) -> list:
    """Run fn(rank, transport) on `world` threads; return the results in rank order, re-raising the
    first exception (the others' barrier then breaks, so nobody hangs)."""
    group = group or ThreadGroup(world)
    assert group.world_size == world
    results: list[Any] = [None] * world
    errors: list[BaseException | None] = [None] * world

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, group.transport(rank))
        except BaseException as e:   # noqa: BLE001 - handed to the caller
            errors[rank] = e
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results

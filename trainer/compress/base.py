"""The compressor interface: average one flat fp32 gradient bucket across ranks, possibly lossily.

A compressor sees a DDP bucket as a flat float32 tensor plus `ParamView`s that say which parameter
occupies which slice (complex parameters occupy 2x their numel as interleaved (real, imag) floats).
It talks to the other ranks only through a `Transport`, so the same code runs over torch.distributed
(gloo, NCCL) and over MPI (mpi4py). Every rank must issue the same collectives in the same order.

State (error-feedback residuals, warm starts, EF21 estimates) is kept per parameter name and is
transactional: `exchange` writes to a pending copy, and the trainer calls `commit()` after a step that
was applied on every rank, or `rollback()` after a step skipped for a non-finite gradient, so a bad
step never poisons the state. `local` state is this rank's own (residuals); `replicated` state is
identical on every rank (e.g. PowerSGD's warm-start Q, EF21's global estimate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch


@dataclass(frozen=True)
class ParamView:
    name: str          # from model.named_parameters()
    offset: int        # first float32 element of this parameter in the flat bucket
    numel: int         # float32 elements (2 * numel for complex parameters)
    shape: tuple       # the parameter's own shape (complex shape for complex parameters)
    is_complex: bool

    def slice(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset:self.offset + self.numel]


class Transport(Protocol):
    """Blocking collectives over CPU or GPU tensors; sums, never averages."""
    rank: int
    world_size: int
    name: str

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor: ...            # in-place sum, returns t
    def allgather(self, t: torch.Tensor) -> torch.Tensor: ...             # (world, *t.shape)
    def all_to_all(self, t: torch.Tensor) -> torch.Tensor: ...            # t (world, m): row j goes to rank j;
                                                                          # returns (world, m), row j from rank j
    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor: ...


class GradientPlan(NamedTuple):
    """What a cost model needs to know of a model's gradient: n floats in all, and PowerSGD's (P floats, Q floats)
    for each matrix it compresses with the floats it sends as they are (trainer/compress/auto.py, powersgd_plan)."""
    n: int
    matrices: list[tuple[int, int]]
    n_small: int


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bucket_views(named: list[tuple[str, torch.Tensor]]) -> list[ParamView]:
    """Where each (name, parameter) of a bucket sits in its flat buffer, in order (complex ones as 2x float32)."""
    views, offset = [], 0
    for name, p in named:
        n = p.numel() * (2 if p.is_complex() else 1)
        views.append(ParamView(name, offset, n, tuple(p.shape), p.is_complex()))
        offset += n
    return views


def local_exchange_seconds(cls, cfg, n: int) -> float:
    """Median seconds of `cls`'s whole exchange of n floats (one flat parameter) on a world of one: every pass it
    makes (encode, error feedback, decode), no communication. A fresh compressor, discarded after."""
    from trainer.compress.transport import LocalTransport
    compressor = cls(cfg, LocalTransport())
    compressor.seed = 0
    x, views = torch.randn(n), [ParamView("grad", 0, n, (n,), False)]

    def step():
        compressor.exchange(x.clone(), views)
        compressor.commit()
    return timed(step)


class Compressor:
    """Base class: subclasses implement `exchange` and keep state through `get`/`put`, and, to be a candidate of
    `comm.compressor = "auto"`, their cost model: `collectives` and `encode_seconds`."""

    name = "base"
    error_feedback = False
    cost_model = False        # True where collectives/encode_seconds are defined

    @classmethod
    def collectives(cls, cfg, plan: GradientPlan, w: int) -> list[tuple[str, float]]:
        """(collective, payload bytes) one step issues for the whole gradient `plan` over w ranks, collective one of
        "allreduce", "all_to_all", "allgather" (costed by auto.py's alpha-beta model, counted as CountingTransport
        counts them)."""
        raise NotImplementedError(f"compressor {cls.name!r} has no cost model")

    @classmethod
    def encode_seconds(cls, cfg, n: int) -> float:
        """Seconds of this rank's local encode + decode work per step for n floats, timed with the kernels the
        compressor uses."""
        return 0.0

    def __init__(self, cfg, transport: Transport):
        self.cfg = cfg
        self.transport = transport
        self.local: dict[str, torch.Tensor] = {}
        self.replicated: dict[str, torch.Tensor] = {}
        self._pending_local: dict[str, torch.Tensor] = {}
        self._pending_replicated: dict[str, torch.Tensor] = {}

    # ---- the work ----
    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> torch.Tensor:
        """Return the rank-average of `grad` as this compressor approximates it, identical on every rank. `grad`
        may be modified in place. Bytes are counted by the transport (CountingTransport), nowhere else."""
        raise NotImplementedError

    # ---- transactional state ----
    def get(self, key: str, local: bool = True) -> torch.Tensor | None:
        pending, committed = ((self._pending_local, self.local) if local
                              else (self._pending_replicated, self.replicated))
        return pending.get(key, committed.get(key))

    def put(self, key: str, value: torch.Tensor, local: bool = True) -> None:
        (self._pending_local if local else self._pending_replicated)[key] = value

    def commit(self) -> None:
        self.local.update(self._pending_local)
        self.replicated.update(self._pending_replicated)
        self.rollback()

    def rollback(self) -> None:
        self._pending_local, self._pending_replicated = {}, {}

    def state_dict(self) -> dict:
        return {"local": dict(self.local), "replicated": dict(self.replicated)}

    def load_state_dict(self, state: dict, same_world: bool) -> str | None:
        """Restore state. With a different world size local residuals no longer belong to anyone:
        they are dropped (the default; a subclass may re-partition instead). Returns what was reset,
        for the log, or None."""
        self.replicated = dict(state.get("replicated", {}))
        self.rollback()
        if same_world:
            self.local = dict(state.get("local", {}))
            return None
        self.local = {}
        return "local error-feedback state reset (world size changed)" if state.get("local") else None


# ---- helpers the compressors share -------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def bucket_state(comp: Compressor, views: list[ParamView], suffix: str, like: torch.Tensor,
                 local: bool = True) -> torch.Tensor:
    """Per-parameter state `name + suffix` laid out like the bucket `like` (zeros where absent), so state
    survives DDP re-bucketing."""
    out = torch.zeros_like(like)
    for v in views:
        t = comp.get(v.name + suffix, local)
        if t is not None and t.numel() == v.numel:
            v.slice(out).copy_(t)
    return out


def add_bucket_state_(comp: Compressor, views: list[ParamView], suffix: str, flat: torch.Tensor,
                      local: bool = True) -> torch.Tensor:
    """flat += the per-parameter state `name + suffix` where it exists (`bucket_state` without the zeros pass)."""
    for v in views:
        t = comp.get(v.name + suffix, local)
        if t is not None and t.numel() == v.numel:
            v.slice(flat).add_(t)
    return flat


def put_bucket_state(comp: Compressor, views: list[ParamView], suffix: str, flat: torch.Tensor,
                     local: bool = True, copy: bool = True) -> None:
    """Split a bucket-layout tensor back into per-parameter pending state (copies, since `flat` may be reused;
    copy=False keeps views of a tensor the caller hands over)."""
    for v in views:
        comp.put(v.name + suffix, v.slice(flat).clone() if copy else v.slice(flat), local)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mixed_seed(*values: int) -> int:
    """A 64-bit seed from several ints (SplitMix64 chained), stable across processes and Python versions."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h


def call_generator(comp: Compressor, device: torch.device) -> torch.Generator:
    """A generator seeded from (run seed, rank, exchange-call counter): deterministic, different on every
    rank and call, and resumable (the counter is replicated state, so it is checkpointed and rolled back)."""
    calls = comp.get("rng_calls", local=False)
    count = 0 if calls is None else int(calls)
    comp.put("rng_calls", torch.tensor(count + 1, dtype=torch.int64), local=False)
    g = torch.Generator(device=device)
    g.manual_seed(mixed_seed(getattr(comp, "seed", 0), comp.transport.rank, count))
    return g


def mean_rows_(m: torch.Tensor) -> torch.Tensor:
    """The mean of the rows of m (W, k), accumulated into row 0 in place and returned (m.sum(0) would zero-fill
    and write a new buffer: a gradient-sized pass more). Adds in row order, the same on every rank."""
    y = m[0]
    for j in range(1, m.shape[0]):
        y += m[j]
    return y.div_(m.shape[0]) if m.shape[0] > 1 else y


def shard_length(n: int, world: int, unit: int) -> int:
    """Elements per shard when n is padded to `world` equal shards that are whole multiples of `unit`."""
    return max(-(-n // (world * unit)), 1) * unit


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret a (rows, m) tensor as (rows, m * itemsize) uint8, to ship mixed dtypes in one collective."""
    return t.contiguous().view(torch.uint8)


def from_bytes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `as_bytes` for a column slice of a uint8 message (copied: a view needs aligned storage)."""
    return t.clone(memory_format=torch.contiguous_format).view(dtype)

"""The gradient exchange: the one place where gradients cross ranks.

DDP hands each gradient bucket to a communication hook. Ours runs the configured compressor
(`trainer/compress/`) on one background thread, FIFO in bucket order, so every rank issues its
collectives in the same order while backward continues on the main thread (the exchange of bucket k
overlaps the backward of the layers before it). The hook also

- counts the bytes each rank puts on the wire (`CountingTransport`), next to what an fp32 ring allreduce
  would send;
- notes whether this rank's gradient was non-finite: the trainer agrees on that across ranks and then
  either applies the step and `commit()`s the compressor's state, or skips it and `rollback()`s, so a
  NaN on one rank neither reaches the weights nor poisons error feedback;
- keeps the compressor's state (error feedback, warm starts) `Stateful` for the checkpoint: each rank's
  own part under its own key, the replicated part once.

torch's own `fp16_compress_hook` and `powerSGD_hook` are available as `torch_fp16`/`torch_powersgd`, the
baselines users have today (torch's PowerSGD needs `model.fno.spectral_weights = "real"` to be correct on FNO).
"""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.compress import COMPRESSORS
from trainer.compress.base import Compressor, ParamView, bucket_views
from trainer.compress.powersgd import powersgd_floats, powersgd_matrix
from trainer.compress.simple import AllReduceCompressor
from trainer.compress.transport import make_transport, ring_allreduce_bytes
from trainer.config import CommConfig

log = logging.getLogger("fieldtrain")


@dataclass
class ExchangeStats:
    """Since the last `reset`: bytes this rank sent, next to what fp32 allreduce would have sent, and the seconds the
    exchange worked (encode, collectives, decode; on the exchange thread for DDP, so partly hidden behind backward:
    what was not hidden is the step time minus the compute-only step's)."""
    bytes_sent: int = 0
    bytes_uncompressed: int = 0
    seconds: float = 0.0

    def reset(self) -> tuple[int, int, float]:
        out = (self.bytes_sent, self.bytes_uncompressed, self.seconds)
        self.bytes_sent = self.bytes_uncompressed = 0
        self.seconds = 0.0
        return out


def _blob(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unblob(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def save_compressor_state(compressor: Compressor, transport, step: int, **extra) -> dict:
    """An exchange's checkpoint entry: the replicated state once, this rank's own under `rank<r>` (DCP keeps every
    rank's entry under a distinct key), with what `restore_compressor_state` needs to judge it."""
    state = compressor.state_dict()
    return {"world_size": transport.world_size, "step": step, "compressor": compressor.name, **extra,
            "replicated": _blob(state["replicated"]), f"rank{transport.rank}": _blob(state["local"])}


def restore_compressor_state(compressor: Compressor, transport, state: dict) -> None:
    """Load what `save_compressor_state` wrote into a compressor of the same name; on another world size the
    compressor drops (or re-partitions) per-rank state, and the log says what was reset."""
    same_world = int(state["world_size"]) == transport.world_size
    mine = state.get(f"rank{transport.rank}")
    local = _unblob(mine) if mine is not None else {}   # absent: this rank did not exist in the saving run
    reset = compressor.load_state_dict({"local": local, "replicated": _unblob(state["replicated"])},
                                       same_world=same_world)
    if reset:
        log.warning("world size %s -> %d: %s", state["world_size"], transport.world_size, reset)


class GradientExchange:
    """DDP communication-hook state: the compressor, its transport, byte counters, the non-finite flag."""

    def __init__(self, cfg: CommConfig, module: torch.nn.Module, seed: int = 0, bucket_cap_mb: float = 25.0):
        self.cfg, self.bucket_cap_mb = cfg, bucket_cap_mb
        self.world = make_transport(cfg.transport)
        self.nodes = None
        if cfg.hierarchy == "node":   # compress between nodes only (trainer/compress/hierarchy.py)
            from trainer.compress.hierarchy import NodeGroups
            self.nodes = NodeGroups()
        self.transport = self.world if self.nodes is None else self.nodes.between   # what the compressor runs on
        self.module, self.seed = module, seed
        self.trials = None           # auto: the shortlist's in-training trials while they run (auto.StepTrials)
        self.step = 0
        self.compressor: Compressor = self._build(self._decide(warm=False) if cfg.compressor == "auto" else cfg.compressor)
        self.switches: list[tuple[int, str, str]] = []   # auto: (step, from, to)
        self.warmup = AllReduceCompressor(cfg, self.transport)   # fp32 for the first cfg.start_step steps
        self.stats = ExchangeStats()
        self.local_nonfinite = False
        self.bypass = False          # plain allreduce, nothing counted or stored (see trainer/parallel/ddp.py, _settle_buckets)
        self._names = {id(p): name for name, p in module.named_parameters()}
        self._views: dict[tuple, list[ParamView]] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grad-exchange")

    def _decide(self, warm: bool = True) -> str:
        """auto: measure the link (between nodes, when hierarchical) and pick the compressor (a collective; every rank
        gets the same name). With `comm.auto_trial_steps`, a shortlist of more than one starts in-training trials
        (auto.StepTrials) with the first; before the run's first step (warm=False) they begin after
        auto.TRIAL_WARMUP untimed steps."""
        from trainer.compress import auto
        candidates = list(self.cfg.auto_candidates)
        ranked = torch.full((len(candidates),), -1, dtype=torch.int64)   # shortlist as candidate indices, best first
        if self.nodes is None or self.nodes.is_leader:
            self.transport.link = None   # measure afresh: cloud links change
            _, shortlist = auto.choose_compressor(self.cfg, self.transport, self.module, self.bucket_cap_mb)   # best first
            ranked[:len(shortlist)] = torch.tensor([candidates.index(c) for c in shortlist])
        if self.nodes is not None and self.nodes.local_size > 1:
            self.nodes.local.broadcast_(ranked, src=0)
        shortlist = [candidates[int(i)] for i in ranked if i >= 0]
        self.trials = None
        if self.cfg.auto_trial_steps and len(shortlist) > 1:
            warmup = 0 if warm else auto.TRIAL_WARMUP
            self.trials = auto.StepTrials(shortlist, self.cfg.auto_trial_steps, warmup)
            log.info("auto: %s each run %d training steps from step %d; the fastest is kept", ", ".join(shortlist),
                     self.cfg.auto_trial_steps, max(self.step, self.cfg.start_step) + warmup)
        return shortlist[0]

    def _trial_boundary(self, applied: bool) -> None:
        """A step boundary during in-training trials: the next candidate, or (all run) the choice; every rank is at
        the same applied step, so the allgather below lines up."""
        nxt = self.trials.boundary(time.perf_counter(), applied)
        if nxt is not None:
            self.switch_to(nxt, "in-training trial")
            return
        medians = self.world.allgather(torch.tensor(self.trials.medians(), dtype=torch.float64)).max(0).values
        names = self.trials.names
        best = names[int(torch.argmin(medians))]   # first minimum: ties go to the earlier (predicted faster) one
        log.info("auto: in-training trials, median step seconds (slowest rank): %s -> %s",
                 ", ".join(f"{n} {t:.4f}" for n, t in zip(names, medians.tolist())), best)
        self.trials = None
        self.switch_to(best, "fastest in training")

    def _build(self, name: str) -> Compressor:
        cls = COMPRESSORS[name]
        assert cls is not None, f"{name} is a torch hook, not one of our compressors"
        compressor = cls(self.cfg, self.transport)
        compressor.seed = self.seed
        return compressor

    def switch_to(self, name: str, why: str = "re-decided") -> None:
        """Exchange with `name` from the next step on (called between steps, on every rank at the same step); the
        new compressor's state (error feedback, warm starts) starts afresh, as the log says."""
        if name == self.compressor.name:
            return
        log.warning("auto at step %d (%s): switching compressor %s -> %s (its state starts afresh)", self.step, why,
                    self.compressor.name, name)
        self.switches.append((self.step, self.compressor.name, name))
        self.compressor = self._build(name)

    def views(self, params: list[torch.Tensor], numel: int) -> list[ParamView]:
        """Where each parameter of a bucket sits in its flat buffer (complex ones as 2x float32)."""
        key = tuple(id(p) for p in params)
        if key not in self._views:
            views = bucket_views([(self._names[id(p)], p) for p in params])
            covered = views[-1].offset + views[-1].numel if views else 0
            assert covered == numel, f"bucket layout: params cover {covered} floats, buffer has {numel}"
            self._views[key] = views
        return self._views[key]

    def run(self, buf: torch.Tensor, views: list[ParamView]) -> torch.Tensor:
        """Average one bucket in place (runs on the exchange thread)."""
        if self.bypass:
            return self.world.inner.allreduce_(buf).div_(self.world.world_size)
        if not bool(torch.isfinite(buf).all()):
            self.local_nonfinite = True
        compressor = self.warmup if self.step < self.cfg.start_step else self.compressor
        before, t0 = self.transport.bytes_sent, time.perf_counter()
        if self.nodes is None:
            out = compressor.exchange(buf, views)
            if out is not buf:
                buf.copy_(out)
        else:
            self.nodes.reduce(buf, lambda node_mean: compressor.exchange(node_mean, views))
        self.stats.seconds += time.perf_counter() - t0
        self.stats.bytes_sent += self.transport.bytes_sent - before   # between nodes, when hierarchical
        self.stats.bytes_uncompressed += ring_allreduce_bytes(buf.numel() * 4, self.world.world_size)
        return buf

    # ---- called by the trainer once per step, after backward ----
    def end_step(self, applied: bool) -> None:
        (self.compressor.commit if applied else self.compressor.rollback)()
        self.local_nonfinite = False
        warmup = self.step < self.cfg.start_step   # this step exchanged in fp32, not with the compressor
        if applied:
            self.step += 1
        if self.trials is not None and not warmup:
            self._trial_boundary(applied)
        every = self.cfg.auto_every
        if applied and self.cfg.compressor == "auto" and every and self.step % every == 0:   # a step all ranks share
            self.switch_to(self._decide())

    # ---- Stateful ----
    def state_dict(self) -> dict:
        trials = None if self.trials is None else self.trials.state_dict()
        return save_compressor_state(self.compressor, self.transport, self.step, trials=_blob(trials))

    def optional_keys(self) -> list[str]:
        return ["trials"]    # absent from checkpoints written before in-training trials

    def load_state_dict(self, state: dict) -> None:
        from trainer.compress.auto import StepTrials
        self.step = int(state["step"])
        if self.cfg.compressor == "auto" and state["compressor"] in self.cfg.auto_candidates:
            self.compressor = self._build(state["compressor"])   # auto resumes with what it had chosen, and its state
            trials = _unblob(state["trials"]) if "trials" in state else None
            # trials in progress go on from where they were, unless this run turned them off
            self.trials = StepTrials.from_state(trials) if trials and self.cfg.auto_trial_steps else None
        if state["compressor"] != self.compressor.name:
            log.warning("checkpoint's compressor was %s, this run uses %s: starting its state afresh",
                        state["compressor"], self.compressor.name)
            return
        restore_compressor_state(self.compressor, self.transport, state)

    def per_rank_keys(self) -> list[str]:
        return [f"rank{self.transport.rank}"]


def _ddp_hook(state, bucket):   # unannotated: DDP checks annotations, and this module's are strings
    buf = bucket.buffer()
    views = state.views(bucket.parameters(), buf.numel())
    fut = torch.futures.Future()

    def work():
        try:
            fut.set_result(state.run(buf, views))
        except Exception as e:   # surfaces in backward() on the main thread
            fut.set_exception(e)

    state._thread.submit(work)
    return fut


def _torch_powersgd_bytes(bucket, cfg: CommConfig) -> int:
    """Allreduced bytes of torch's powerSGD_hook for one bucket (its rule is ours: `powersgd_matrix`, on real views)."""
    total = 0
    for g in bucket.gradients():
        matrix = powersgd_matrix(tuple(g.shape), False, cfg, real_view=True, view="first")
        total += 4 * (sum(powersgd_floats(*matrix)) if matrix else g.numel())
    return total


class TorchHookExchange:
    """torch's fp16/PowerSGD hooks behind the same face as GradientExchange (stats, non-finite flag).
    Their state is not checkpointed: they are baselines for benchmarks."""

    def __init__(self):
        self.stats = ExchangeStats()
        self.local_nonfinite = False

    def end_step(self, applied: bool) -> None:
        self.local_nonfinite = False


def register_torch_hook(ddp_model, name: str, cfg: CommConfig) -> TorchHookExchange:
    """torch's fp16/PowerSGD hooks, each bucket's collectives completed before the next bucket's start
    (torch's PowerSGD chains can interleave differently on different ranks and crash gloo)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    exchange = TorchHookExchange()
    stats = exchange.stats
    if name == "torch_fp16":
        hook, hook_state = default_hooks.fp16_compress_hook, None
        payload = lambda b: b.buffer().numel() * 2   # noqa: E731
    else:
        hook = powerSGD_hook.powerSGD_hook
        hook_state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.powersgd.rank,
                                                 start_powerSGD_iter=max(2, cfg.start_step),
                                                 min_compression_rate=cfg.powersgd.min_compression_rate)
        payload = lambda b: _torch_powersgd_bytes(b, cfg)  # noqa: E731

    world = dist.get_world_size()

    def serialised(state, bucket):
        if not bool(torch.isfinite(bucket.buffer()).all()):
            exchange.local_nonfinite = True
        stats.bytes_sent += ring_allreduce_bytes(payload(bucket), world)
        stats.bytes_uncompressed += ring_allreduce_bytes(bucket.buffer().numel() * 4, world)
        t0 = time.perf_counter()
        out = hook(state, bucket).wait()
        stats.seconds += time.perf_counter() - t0
        fut = torch.futures.Future()
        fut.set_result(out)
        return fut

    ddp_model.register_comm_hook(hook_state, serialised)
    return exchange


def attach(ddp_model: torch.nn.parallel.DistributedDataParallel, exchange: GradientExchange) -> None:
    """`exchange` averages `ddp_model`'s buckets (its communication hook), quietly."""
    ddp_model.register_comm_hook(exchange, _ddp_hook)


def register_gradient_exchange(ddp_model: torch.nn.parallel.DistributedDataParallel,
                               exchange: GradientExchange) -> GradientExchange:
    attach(ddp_model, exchange)
    cfg = exchange.cfg
    nodes = exchange.nodes
    log.info("gradient exchange: %s over %s (%d ranks%s)", exchange.compressor.name, cfg.transport,
             exchange.world.world_size, "" if nodes is None else
             f"; hierarchical: {len(nodes.nodes)} nodes x {nodes.local_size}, fp32 inside a node, compressed between")
    return exchange

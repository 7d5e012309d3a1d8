"""DDP: every rank holds the whole model; gradients are averaged bucket by bucket during backward by a DDP
communication hook that runs our compressor (trainer/comm.py), or by torch's own fp16/PowerSGD hooks."""

from __future__ import annotations

import functools
import gc
import logging
import statistics
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.comm import GradientExchange, attach, register_gradient_exchange, register_torch_hook
from trainer.compress import COMPRESSORS
from trainer.compress.auto import choose_bucket_cap
from trainer.parallel.engine import Engine, ExampleLoss, MakeOptimizer


log = logging.getLogger("fieldtrain")

DEFAULT_BUCKET_CAP_MB = 25.0   # DDP's own default


class DDPEngine(Engine):
    name = "ddp"
    compressors = tuple(COMPRESSORS)
    hierarchical = True

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.comm.hierarchy != "none" and cfg.comm.compressor.startswith("torch_"):
            raise ValueError(f"config key 'comm.hierarchy' = {cfg.comm.hierarchy!r} needs one of our compressors; "
                             f"comm.compressor = {cfg.comm.compressor!r} is torch's own DDP hook")
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(cfg.parallel, key) != "float32":
                raise ValueError(f"config key 'parallel.{key}' = {getattr(cfg.parallel, key)!r} needs a sharded "
                                 "engine (parallel.engine = 'fsdp2' or 'deepspeed'); under 'ddp' allowed: 'float32' "
                                 "(reduced-precision exchange there: comm.compressor = 'fp16')")

    def __init__(self, cfg, model: torch.nn.Module, device: torch.device, make_optimizer: MakeOptimizer,
                 example_loss: ExampleLoss):
        super().__init__(cfg, model, device, make_optimizer, example_loss)
        model.to(device)
        if self.world_size > 1:   # with one rank there is nothing to exchange: the model stays unwrapped
            comm, cap = cfg.comm, cfg.parallel.bucket_cap_mb
            exchange = None
            if not comm.compressor.startswith("torch_"):
                exchange = GradientExchange(comm, model, cfg.run.seed, cap or DEFAULT_BUCKET_CAP_MB)
            wrap = functools.partial(DDP, model, device_ids=[device.index] if device.type == "cuda" else None)
            if not cap:   # 0: chosen for overlap with backward, from the model, the measured link and cores
                cap = DEFAULT_BUCKET_CAP_MB
                if exchange is not None:
                    ranked = choose_bucket_cap(comm, exchange.compressor.name, exchange.transport, model,
                                               lambda: example_loss(model, rows=cfg.data.batch_size).backward)
                    model.zero_grad(set_to_none=True)
                    cap = timed_bucket_caps(wrap, exchange, example_loss, cfg.data.batch_size, ranked)
            self.bucket_cap_mb = cap
            self.model = wrap(bucket_cap_mb=cap)
            if exchange is None:
                self.exchange = register_torch_hook(self.model, comm.compressor, comm)
            else:
                self.exchange = register_gradient_exchange(self.model, exchange)
                _settle_buckets(self.model, self.exchange, example_loss)
        self.optimizer = make_optimizer(self.model.parameters())

    def local_nonfinite(self) -> bool:
        if self.exchange is not None:   # the hook saw every local gradient before it was averaged
            return self.exchange.local_nonfinite
        return super().local_nonfinite()


def backward_seconds(model: torch.nn.Module, example_loss: ExampleLoss, batch_size: int, repeats: int = 3,
                     after=None) -> float:
    """Seconds of one backward at the training batch size: the median of `repeats` backwards of the example batch
    built at `batch_size` samples (ModelSpec.example_batch), after one warm-up. (Scaling a one-sample backward by the
    batch size instead multiplies its fixed per-op cost too: several times the real backward for small models.)
    `after()` runs after each backward, untimed. Gradients are discarded."""
    times = []
    for _ in range(repeats + 1):
        loss = example_loss(model, rows=batch_size)
        t0 = time.perf_counter()
        loss.backward()
        times.append(time.perf_counter() - t0)
        if after is not None:
            after()
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


BUCKET_TRIALS = 2     # bucket layouts timed in backward with the exchange: the model's best and one bucket
BUCKET_TRIAL_STEPS = 4


def timed_bucket_caps(wrap, exchange: GradientExchange, example_loss: ExampleLoss, batch_size: int,
                      ranked: list[float], steps: int = BUCKET_TRIAL_STEPS) -> float:
    """The cap, of the model's best BUCKET_TRIALS and its one-bucket cap (`choose_bucket_cap`'s ranking), whose
    backward with the exchange running is fastest: the median of `steps` backwards of the training batch after one
    warm-up, the slowest rank's. A start-up model misses costs that only show inside backward (on ranks without a
    spare core each bucket's exchange costs more there than any measurement apart from it); this is the real thing:
    the model's DDP at that cap, our hook, the compressor (its state rolled back after every backward, gradients and
    counters discarded). Every rank tries the same caps in the same order (DDP construction is a collective)."""
    caps = list(dict.fromkeys(ranked[:BUCKET_TRIALS] + [max(ranked)]))
    if len(caps) == 1:
        return caps[0]
    step = exchange.step
    exchange.step = exchange.cfg.start_step          # the compressor itself, not the fp32 warm-up steps'
    medians = []
    for cap in caps:
        ddp = wrap(bucket_cap_mb=cap)
        attach(ddp, exchange)
        _settle_buckets(ddp, exchange, example_loss)
        # DDP's backward returns once every bucket's exchange is done; the compressor's state is rolled back each time
        medians.append(backward_seconds(ddp, example_loss, batch_size, steps, after=exchange.compressor.rollback))
        del ddp
        gc.collect()           # the reducer's autograd hooks go with it, before the next DDP adds its own
    exchange.step, exchange.local_nonfinite = step, False
    exchange.stats.reset()
    slowest = exchange.world.allgather(torch.tensor(medians, dtype=torch.float64)).max(0).values.tolist()
    best = caps[slowest.index(min(slowest))]
    log.info("bucket cap: backward with the exchange at each cap (median of %d, slowest rank): %s -> %.2f MB", steps,
             ", ".join(f"{c:.2f} MB {t * 1e3:.1f} ms" for c, t in zip(caps, slowest)), best)
    return best


def _settle_buckets(ddp: DDP, exchange: GradientExchange, example_loss: ExampleLoss) -> None:
    """DDP's first backward runs with one bucket and then re-buckets by gradient-ready order. Compressors that
    work per bucket (quantisation shards, top-k, server-side residuals) must see the same layout at every step
    whether a run started at step 0 or resumed at step k, so one throw-away backward (plain allreduce, grads
    discarded, no optimizer step, no compressor state touched) settles the layout before training starts."""
    exchange.bypass = True
    example_loss(ddp).backward()
    exchange.bypass = False
    ddp.module.zero_grad(set_to_none=True)

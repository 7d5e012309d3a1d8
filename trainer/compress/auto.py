"""`comm.compressor = "auto"`: measure the link, predict each compressor's exchange time, pick the fastest.

Link model (Hockney's alpha-beta): a message of b bytes costs alpha + beta*b. For W ranks,
    allreduce (ring)   2(W-1) alpha + 2 (W-1)/W * b * beta          b = the full buffer
    all_to_all         (W-1) alpha + (W-1)/W * b * beta             b = the full (W, m) buffer
    allgather          (W-1) alpha + (W-1) * b * beta               b = one rank's part
alpha and beta come from timed allreduces of a small and a large buffer at start-up (the slowest rank's
times, so every rank decides the same). Each compressor's local encode/decode time is measured on the
model's own gradient size with the kernels it uses. Per step, a compressor costs its collectives on every
DDP bucket plus its encode/decode.

The model prunes; a measurement decides. Predictions miss what the formulas leave out (a compressor's extra
passes, error feedback, Python overhead per collective, a transport's per-message cost: sign's predicted 49 ms
measured ~160 ms at 100 Mbit/s), so the candidates predicted within SHORTLIST x the best are timed doing the real
thing, `comm.auto_trials` exchanges each of a gradient of the model's size and bucket layout on the live link
(fresh compressors, discarded after: training state is untouched), and the fastest measured wins (the slowest rank's
time, so every rank decides the same). The prediction table, the measured times and the choice are logged.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from typing import Callable

import torch

from trainer.compress.base import GradientPlan, timed
from trainer.compress.powersgd import powersgd_floats, powersgd_matrix

log = logging.getLogger("fieldtrain")


def _timed_allreduce(transport, n: int, repeats: int) -> float:
    """Fastest of `repeats` allreduces of n floats, each started right after a tiny one that lines the
    ranks up, so arrival skew is not counted as link time."""
    t, sync = torch.zeros(n), torch.zeros(1)
    transport.allreduce_(t)   # warm-up (connection set-up, allocation)
    best = math.inf
    for _ in range(repeats):
        transport.allreduce_(sync)
        t0 = time.perf_counter()
        transport.allreduce_(t)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_link(transport, small: int = 256, large: int = 1 << 20, repeats: int = 7) -> tuple[float, float]:
    """(alpha seconds, beta seconds/byte) from fp32 allreduces of `small` and `large` elements; measured once per
    transport (a collective: every rank calls it), then remembered on it."""
    if getattr(transport, "link", None) is not None:
        return transport.link
    transport.link = _measure_link(transport, small, large, repeats)
    return transport.link


def _measure_link(transport, small: int, large: int, repeats: int) -> tuple[float, float]:
    w = transport.world_size
    t = torch.tensor([_timed_allreduce(transport, small, repeats), _timed_allreduce(transport, large, repeats)],
                     dtype=torch.float64)
    # every rank must choose the same compressor: decide on the slowest rank's numbers
    t = transport.allgather(t).max(0).values
    ring = 2 * (w - 1) / w
    beta = max((t[1] - t[0]).item() / (ring * 4 * (large - small)), 1e-12)
    alpha = max((t[0].item() - ring * 4 * small * beta) / (2 * (w - 1)), 0.0)
    return alpha, beta


def _wire_bytes(kind: str, nbytes: float, w: int) -> float:
    """Bytes one rank sends (the same model as trainer/compress/transport.py's CountingTransport)."""
    return {"allreduce": 2 * (w - 1) / w, "all_to_all": (w - 1) / w, "allgather": w - 1}[kind] * nbytes


def _collective_time(kind: str, nbytes: float, w: int, alpha: float, beta: float) -> float:
    messages = {"allreduce": 2 * (w - 1), "all_to_all": w - 1, "allgather": w - 1}[kind]
    return messages * alpha + _wire_bytes(kind, nbytes, w) * beta


def _compressors() -> dict:
    from trainer.compress import COMPRESSORS   # (the registry imports the compressors, which import this module's
    return COMPRESSORS                         # neighbours: resolved at call time)


def candidates() -> tuple[str, ...]:
    """The compressors with a cost model (`Compressor.cost_model`): what `auto` can choose from."""
    return tuple(name for name, cls in _compressors().items() if cls is not None and cls.cost_model)


def powersgd_plan(shapes: list[tuple[tuple[int, ...], bool]], cfg) -> tuple[list[tuple[int, int]], int]:
    """PowerSGD's (P floats, Q floats) for each parameter it compresses, and the floats of those it sends as they
    are, for parameters given as (shape, is_complex)."""
    matrices, n_small = [], 0
    for shape, is_complex in shapes:
        matrix = powersgd_matrix(tuple(shape), is_complex, cfg)
        if matrix is not None:
            matrices.append(powersgd_floats(*matrix))
        else:
            n_small += math.prod(shape) * (2 if is_complex else 1)
    return matrices, n_small


def gradient_plan(module: torch.nn.Module, cfg) -> GradientPlan:
    shapes = [(p.shape, p.is_complex()) for p in module.parameters() if p.requires_grad]
    return GradientPlan(sum(math.prod(s) * (2 if c else 1) for s, c in shapes), *powersgd_plan(shapes, cfg))


def collectives(name: str, cfg, n: int, matrices: list[tuple[int, int]], n_small: int, w: int) -> list[tuple[str, float]]:
    """(collective, bytes) one step of `name` issues for a gradient of n floats: the compressor's own cost model."""
    cls = _compressors().get(name)
    if cls is None or not cls.cost_model:
        raise ValueError(f"comm.auto_candidates: no cost model for {name!r}")
    return cls.collectives(cfg, GradientPlan(n, matrices, n_small), w)


BUCKET_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16)


def exposed_time(t_backward: float, buckets: int, comm: float, encode: float, latency: float,
                 latency_busy: float | None = None, hidden: float = 1.0) -> float:
    """Seconds the exchange adds after backward when the gradient leaves in `buckets` equal buckets, bucket j ready
    at t_backward * j / buckets (gradients appear at an even rate) and exchanged one after another on one thread.
    Each bucket takes comm / buckets on the wire, `hidden` of its encode / buckets beside backward, and its
    collectives' latency: `latency_busy` while backward still runs (the exchange thread then competes with it for
    the cores: scheduler wake-ups), `latency` after. The encode's other (1 - hidden) is CPU that backward cannot
    hide (the exchange shares its core): it lengthens the step whatever the bucket count."""
    busy = latency if latency_busy is None else latency_busy
    finish = 0.0
    for j in range(1, buckets + 1):
        start = max(finish, t_backward * j / buckets)
        finish = start + (comm + hidden * encode) / buckets + (busy if start < t_backward else latency)
    return finish - t_backward + (1 - hidden) * encode


def side_thread_costs(transport, forward: Callable[[], Callable[[], None]], repeats: int = 3, allreduces: int = 16
                      ) -> tuple[float, float, float]:
    """(backward, hidden, busy): backward's seconds alone, and what an exchange thread costs beside it on this rank's
    cores; the slowest rank's (every rank calls it at once: a collective). `forward()` runs a forward pass and returns its backward, the timed part (the
    exchange runs beside backward, which holds no GIL; a forward's Python would hold it).
    hidden: the fraction of CPU work on a second thread that runs beside backward without lengthening it, from
    backward timed alone and beside a thread doing small matmuls: 1 - (t_beside - t_alone) / (work done beside it,
    in seconds timed alone); 1 when the exchange has a core of its own, 0 when they share one.
    busy: the seconds of a one-float allreduce issued from a second thread while backward runs (the median of
    `allreduces`): on an idle core a few tens of microseconds, on a busy one the scheduler's wake-up delays."""
    a, b = torch.randn(192, 192), torch.randn(192, 192)
    unit = timed(lambda: torch.mm(a, b), repeats=9)

    def window() -> tuple[float, float]:
        backward = forward()
        t0 = time.perf_counter()
        backward()
        return t0, time.perf_counter()

    transport.allgather(torch.zeros(1, dtype=torch.float64))        # a barrier: every rank measures at once
    alone = statistics.median([t1 - t0 for t0, t1 in [window() for _ in range(repeats + 1)][1:]])
    stop, stamps = threading.Event(), []

    def spin():
        while not stop.is_set():
            torch.mm(a, b)
            stamps.append(time.perf_counter())
    side = threading.Thread(target=spin, daemon=True)
    side.start()
    while len(stamps) < 3:        # a new thread's first matmuls set up its kernels' buffers: not what is measured
        time.sleep(unit)
    beside, done = [], []
    for t0, t1 in [window() for _ in range(repeats)]:
        beside.append(t1 - t0)
        done.append(unit * sum(t0 <= t <= t1 for t in stamps))
    stop.set()
    side.join()
    slowed, work = statistics.median(beside) - alone, statistics.median(done)
    hidden = min(1.0, max(0.0, 1 - slowed / work)) if work > unit else 0.0

    transport.allgather(torch.zeros(1, dtype=torch.float64))
    times, tiny = [], torch.zeros(1)

    def ping():
        for _ in range(allreduces):
            t0 = time.perf_counter()
            transport.allreduce_(tiny)
            times.append(time.perf_counter() - t0)
    side = threading.Thread(target=ping, daemon=True)
    side.start()
    while side.is_alive():
        forward()()
    side.join()
    measured = torch.tensor([alone, -hidden, statistics.median(times)], dtype=torch.float64)
    worst = transport.allgather(measured).max(0).values.tolist()
    return worst[0], -worst[1], worst[2]


def choose_bucket_cap(cfg, name: str, transport, module: torch.nn.Module,
                      forward: Callable[[], Callable[[], None]]) -> list[float]:
    """DDP bucket caps (MB) for compressor `name`, least predicted exposed exchange time (`exposed_time`) first, on
    the measured link, over BUCKET_COUNTS (one cap per bucket count the model's parameters fall into); ties go to
    fewer buckets. The exchange's CPU at each bucket layout is measured: the real compressor on a world of one
    (`measure_exchange` over a local transport: encode, decode, per-bucket overhead, no wire); backward's time and
    the exchange thread's cost beside it by `side_thread_costs`, from `forward` (a forward of the training batch,
    returning its backward). Every rank gets the same answer (each measurement is the slowest rank's)."""
    from trainer.compress.transport import LocalTransport
    w, plan = transport.world_size, gradient_plan(module, cfg)
    n = plan.n
    registry = _compressors()
    cls = registry[name] if registry[name].cost_model else registry["none"]
    alpha, beta = measure_link(transport)
    t_backward, hidden, busy = side_thread_costs(transport, forward)
    caps, counts = [], []
    for k in BUCKET_COUNTS:
        cap = 4 * n / k / 2**20 * 1.05      # a little room, as parameters are not split
        count = len(_buckets(module, cap))
        if count not in counts:
            caps.append(cap)
            counts.append(count)
    local = LocalTransport()
    cpu = [measure_exchange(cfg, local, module, cls.name, cap, trials=3) for cap in caps]
    cpu = transport.allgather(torch.tensor(cpu, dtype=torch.float64)).max(0).values.tolist()
    ops = cls.collectives(cfg, plan, w)
    comm = sum(_collective_time(k, b, w, 0.0, beta) for k, b in ops)
    latency = sum(_collective_time(k, 0, w, alpha, 0.0) for k, _ in ops)
    # busy: one allreduce of a float timed whole; each collective of the bucket pays it (all_to_all, allgather alike)
    latency_busy = len(ops) * max(busy, latency / len(ops))
    rows = [(exposed_time(t_backward, count, comm, c, latency, latency_busy, hidden), count, cap)
            for count, c, cap in zip(counts, cpu, caps)]
    ranked = sorted(rows)
    log.info("bucket cap: %s over alpha %.1f us, %.3f Gbit/s, backward %.1f ms, wire %.1f ms per step, beside "
             "backward: %.0f%% of its CPU hidden, collective %.2f ms; by bucket count, the exchange's CPU and the "
             "exposed time: %s -> %d bucket(s), cap %.2f MB", name, alpha * 1e6, 8 / beta / 1e9, t_backward * 1e3,
             comm * 1e3, 100 * hidden, busy * 1e3,
             ", ".join(f"{k}: {c * 1e3:.1f} / {t * 1e3:.1f} ms" for (t, k, _), c in zip(rows, cpu)), *ranked[0][1:])
    return [cap for _, _, cap in ranked]


SHORTLIST = 2.0     # candidates predicted within this factor of the best are measured
TRIAL_WARMUP = 5    # untimed steps before the in-training trials at the start of a run (bench/comm.py's WARMUP_STEPS)
MAX_TRIALED = 3     # ... at most this many, in predicted order


def _buckets(module: torch.nn.Module, bucket_cap_mb: float) -> list[list[tuple[str, torch.Tensor]]]:
    """The trainable parameters in DDP's bucket order (reverse registration order, cut at the cap)."""
    cap, buckets, size = bucket_cap_mb * 2**20, [[]], 0
    for name, p in reversed([(n, p) for n, p in module.named_parameters() if p.requires_grad]):
        nbytes = 4 * p.numel() * (2 if p.is_complex() else 1)
        if buckets[-1] and size + nbytes > cap:
            buckets.append([])
            size = 0
        buckets[-1].append((name, p))
        size += nbytes
    return buckets


def measure_exchange(cfg, transport, module: torch.nn.Module, name: str, bucket_cap_mb: float, trials: int) -> float:
    """Seconds one step of `name`'s exchange takes on this rank (the fastest of `trials`, after one warm-up), on a
    random gradient of the module's size in its bucket layout; a fresh compressor, discarded after. A collective:
    every rank calls it with the same arguments."""
    from trainer.compress.base import bucket_views
    compressor = _compressors()[name](cfg, transport)
    compressor.seed = 0
    layout = []
    for bucket in _buckets(module, bucket_cap_mb):
        views = bucket_views(bucket)
        numel = views[-1].offset + views[-1].numel
        layout.append((torch.randn(numel, generator=torch.Generator().manual_seed(len(layout))), views))
    sync = torch.zeros(1)
    best = math.inf
    for trial in range(trials + 1):
        transport.allreduce_(sync)       # line the ranks up: arrival skew is not exchange time
        t0 = time.perf_counter()
        for grad, views in layout:
            compressor.exchange(grad.clone(), views)
        if trial:
            best = min(best, time.perf_counter() - t0)
        compressor.rollback()
    return best


def encode_costs(classes: list, cfg, n: int, transport) -> list[float]:
    """Each class's measured `encode_seconds` for n floats, the slowest rank's. Every rank first runs each once and
    waits for the others: first calls compile kernels (torch.compile runs gcc in worker processes), and a rank
    timing its codecs while another compiles beside it on the same cores measured them 5-7x too slow."""
    for cls in classes:
        cls.encode_seconds(cfg, n)
    transport.allgather(torch.zeros(1, dtype=torch.float64))   # a barrier
    encode = torch.tensor([cls.encode_seconds(cfg, n) for cls in classes], dtype=torch.float64)
    return transport.allgather(encode).max(0).values.tolist()


def choose_compressor(cfg, transport, module: torch.nn.Module, bucket_cap_mb: float = 25.0) -> tuple[str, list[str]]:
    """The fastest candidate per step for gradients sent in buckets of `bucket_cap_mb`: predicted by the cost model
    for all, measured for the shortlist (module docstring); ties go to the earlier candidate. Also the shortlist,
    fastest first, for the in-training trials (`StepTrials`)."""
    w, plan, registry = transport.world_size, gradient_plan(module, cfg), _compressors()
    n = plan.n
    buckets = max(1, math.ceil(4 * n / (bucket_cap_mb * 2**20)))
    alpha, beta = measure_link(transport)
    encode = encode_costs([registry[c] for c in cfg.auto_candidates], cfg, n, transport)
    rows = []
    for name, enc in zip(cfg.auto_candidates, encode):
        ops = registry[name].collectives(cfg, plan, w)
        comm = sum(_collective_time(k, b / buckets, w, alpha, beta) * buckets for k, b in ops)
        sent = sum(_wire_bytes(k, b, w) for k, b in ops)
        rows.append((comm + enc, name, comm, enc, sent))
    best_predicted = min(r[0] for r in rows)
    shortlist = [r[1] for r in sorted(rows, key=lambda r: r[0]) if r[0] <= SHORTLIST * best_predicted][:MAX_TRIALED]
    measured = {}
    if cfg.auto_trials and len(shortlist) > 1:
        t = torch.tensor([measure_exchange(cfg, transport, module, name, bucket_cap_mb, cfg.auto_trials)
                          for name in shortlist], dtype=torch.float64)
        measured = dict(zip(shortlist, transport.allgather(t).max(0).values.tolist()))
    best = log_choice(rows, f"auto compressor: link alpha {alpha * 1e6:.1f} us, {8 / beta / 1e9:.3f} Gbit/s over {w} "
                            f"ranks, {n} floats in {buckets} bucket(s)", measured)
    return best, [best] + sorted((c for c in shortlist if c != best), key=lambda c: measured.get(c, 0.0))


def log_choice(rows: list[tuple[float, str, float, float, float]], header: str,
               measured: dict[str, float] | None = None) -> str:
    """The name of the row with the least measured step seconds, or (none measured) the least predicted, of rows
    (predicted step seconds, name, comm s, encode s, bytes sent); the table is logged."""
    measured = measured or {}
    best = (min(measured, key=lambda name: (measured[name], [r[1] for r in rows].index(name))) if measured
            else min(rows, key=lambda r: r[0])[1])
    lines = [f"  {name:9s} predicted {t * 1e3:8.2f} ms/step (comm {c * 1e3:8.2f}, encode {e * 1e3:6.2f}) "
             f"sends {s / 1e6:7.3f} MB" + (f"   measured {measured[name] * 1e3:8.2f} ms" if name in measured else "")
             for t, name, c, e, s in rows]
    log.info("%s\n%s\n  -> %s", header, "\n".join(lines), best)
    return best


class StepTrials:
    """`comm.auto_trial_steps`: the shortlist's last word is said inside training. An exchange timed alone between
    steps is not the exchange inside a step, where its thread shares the rank's cores with backward and the next
    step's work (at 100 Mbit/s top-k measured 26 ms alone and cost 150 ms a step in training: README, bench/README).
    So each shortlisted candidate runs `steps` applied training steps in turn; the wall time between step
    boundaries, after each candidate's first step (allocation, first calls), is its measurement; the candidate with
    the least median step time (the slowest rank's, so all agree) is kept. Steps that are not applied (a non-finite
    gradient) are not timed. A run's first steps are slow for every compressor (allocations, first calls: the first
    candidate's in-training time measured 0.42-0.45 s a step against 0.31 s once warm), so at the start of a run the
    first candidate runs `warmup` more untimed steps. Resumable: the position and the times so far are state."""

    def __init__(self, names: list[str], steps: int, warmup: int = 0):
        assert steps >= 2 and len(names) > 1 and warmup >= 0, (names, steps, warmup)
        self.names, self.steps = list(names), steps
        self.index, self.count = 0, -warmup
        self.times: dict[str, list[float]] = {n: [] for n in self.names}
        self.last: float | None = None   # wall time of the previous step boundary

    @property
    def current(self) -> str:
        return self.names[self.index]

    def boundary(self, now: float, applied: bool) -> str | None:
        """A step boundary at wall time `now`. The candidate to run next, or None when every candidate has run
        (then `medians()` is the measurement)."""
        if applied:
            if self.count > 0 and self.last is not None:
                self.times[self.current].append(now - self.last)
            self.count += 1
            if self.count == self.steps:
                self.index, self.count = self.index + 1, 0
        self.last = now
        return self.current if self.index < len(self.names) else None

    def medians(self) -> list[float]:
        return [statistics.median(self.times[n]) if self.times[n] else math.inf for n in self.names]

    def state_dict(self) -> dict:
        return {"names": self.names, "steps": self.steps, "index": self.index, "count": self.count,
                "times": self.times}

    @classmethod
    def from_state(cls, state: dict) -> "StepTrials":
        trials = cls(state["names"], state["steps"])
        trials.index, trials.count = int(state["index"]), int(state["count"])
        trials.times = {n: [float(t) for t in ts] for n, ts in state["times"].items()}
        return trials

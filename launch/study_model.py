"""A cost model fitted to a study's cells, and its predictions past the cluster (`fieldtrain study predict`).

Per step, a cell of series s (its axes other than world size, nodes and bandwidth) at W ranks takes

    t = c(cell) + sum over the step's collectives k of [ alpha m_k(W') + beta(link) b_k(W') ]

Hockney's alpha-beta model with each engine's and compressor's own collectives (trainer/compress: a compressor's
`collectives` under DDP and ZeRO-1/2, a reduce-scatter form's `scatter_ops` under FSDP2 and ZeRO-3, the sharded engines'
parameter all-gathers), each with its payload p_k:

    collective            messages m_k   bytes one rank sends b_k
    allreduce (ring)      2 (W - 1)      2 (W - 1) / W p      (reduce-scatter then all-gather)
    reduce_scatter        W - 1          (W - 1) / W p
    all_to_all            W - 1          (W - 1) / W p
    allgather             W - 1          (W - 1) p            (p: this rank's part; sparse payloads grow with W)

W' is the world the collectives span: W, or the number of nodes when `comm.hierarchy = "node"` (one leader per node
crosses the slow link; the full-precision exchange inside a node is left out). The bytes b_k are what
CountingTransport counts (the record's `bytes_per_step` is checked against them: `bytes_check`), except the sharded
engines' parameter all-gathers, which are torch's or DeepSpeed's own.

c(cell) is the compute: the same cell with comm.compressor = "skip" (no exchange, same placement) where the study ran
one; else the series' one-rank step time scaled by the cores its ranks shared (max(1, 1 / cores per rank): on this
machine W ranks share its cores, on a cluster each has its own). beta(link) is kappa 8 / bits-per-second on a shaped
link (kappa >= 1: protocol and queueing overhead on the wire) and beta_local on loopback or an unshaped link. alpha,
kappa and beta_local are one non-negative least-squares fit over every cell that exchanges; its error on held-out
cells is each cell predicted by the fit of all the others. A prediction swaps in another link (8 kappa / bps) and,
for another machine (a GPU), c for its measured step compute time. Overlap of the exchange with backward is not
modelled: the prediction is the serial (upper) bound, and the fit's kappa absorbs the overlap the cells showed.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

import numpy as np

WORLD = "world_size"
PLACEMENT = ("world_size", "nodes", "bandwidth")
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_rate(text: str) -> int | None:
    """'10gbit' / '100mbit' / '1.5gbit' -> bits per second; 'unshaped' -> None (no qdisc)."""
    t = text.strip().lower()
    if t == "unshaped":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)", t)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"bandwidth {text!r}: expected a positive tc rate like 10gbit, 100mbit, 500kbit, "
                         f"or 'unshaped'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def ring(w: int) -> float:
    return 2 * (w - 1) / w


def messages(kind: str, w: int) -> float:
    return 2.0 * (w - 1) if kind == "allreduce" else float(w - 1)


def wire_bytes(kind: str, payload: float, w: int) -> float:
    """Bytes one rank sends for one collective of `payload` over w ranks (CountingTransport's rules)."""
    if kind == "allreduce":
        return ring(w) * payload
    if kind == "allgather":
        return (w - 1) * payload
    return (w - 1) / w * payload          # reduce_scatter, all_to_all, the parameter all-gather of a sharded engine


def step_collectives(cfg, shapes: list[tuple[tuple[int, ...], bool]], w: int
                     ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(gradient collectives, parameter all-gathers) one step of `cfg`'s engine and compressor issues over w ranks for
    trainable parameters of `shapes` ((shape, is_complex), a run summary's `param_shapes`): (kind, payload bytes) from
    the compressors' own cost models. Raises ValueError where a compressor has none."""
    from trainer.compress.auto import _compressors, powersgd_plan
    from trainer.compress.base import GradientPlan
    from trainer.compress.scatter import scatter_collectives
    name, engine = cfg.comm.compressor, cfg.parallel.engine
    plan = GradientPlan(sum(math.prod(s) * (2 if c else 1) for s, c in shapes), *powersgd_plan(shapes, cfg.comm))
    if name == "skip" or w == 1:
        grads: list[tuple[str, float]] = []
    elif engine == "ddp" or (engine == "deepspeed" and cfg.parallel.zero_stage < 3):   # the allreduce forms
        cls = _compressors().get(name)
        if cls is None or not cls.cost_model:
            raise ValueError(f"no cost model for comm.compressor = {name!r}")
        grads = [(k, float(b)) for k, b in cls.collectives(cfg.comm, plan, w)]
    else:
        per = math.ceil(plan.n / w) * w
        grads = [(k, float(b)) for k, b in scatter_collectives(name, cfg.comm, per, w)]
    gathers = 0
    if engine == "fsdp2":
        gathers = 2 if cfg.parallel.reshard_after_forward else 1     # forward, and again in backward when resharded
    elif engine == "deepspeed":
        gathers = 2 if cfg.parallel.zero_stage == 3 else 1           # ZeRO-1/2: the updated shards after the step
    params = [("param_allgather", 4.0 * plan.n)] * gathers if w > 1 else []
    return grads, params


def is_floor(rec: dict) -> bool:
    """A cell without gradient exchange (comm.compressor = "skip"): the compute floor of its placement."""
    return rec.get("settings", rec["axes"]).get("comm.compressor") == "skip"


def is_exchange_key(key: str) -> bool:
    """A setting of the gradient exchange (how it runs, not what is trained or where): comm.*, DDP's bucket cap."""
    return key.startswith("comm.") or key == "parallel.bucket_cap_mb"


def floor_key(rec: dict) -> tuple:
    """What a cell shares with its floor: placement and every setting but the exchange's."""
    settings = rec.get("settings", {k: v for k, v in rec["axes"].items() if k not in PLACEMENT})
    return (int(rec[WORLD]), int(rec.get("nodes") or 1), rec.get("bandwidth") if (rec.get("nodes") or 1) > 1 else None,
            tuple(sorted((k, str(v)) for k, v in settings.items() if not is_exchange_key(k))))


def ops_at(table: dict[int, list[tuple[str, float]]], span: int) -> list[tuple[str, float]]:
    """A series' collectives at `span` ranks: as computed there, else at the nearest span computed (log scale; a
    shard's payload shrinks as 1/W, so records carry them at every power of two, launch/study.py `_collectives`)."""
    if span in table:
        return table[span]
    return table[min(table, key=lambda k: abs(math.log(k) - math.log(span)))]


def series_label(rec: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in rec["axes"].items() if k not in PLACEMENT) or "all"


@dataclass
class Point:
    series: str
    w: int
    nodes: int
    bps: int | None                        # the shaped link's rate; None: loopback or unshaped
    t: float                               # median step time
    compute: float
    ops: list[tuple[str, float]]           # every collective, with payload
    span: int                              # the world the collectives span (W, or nodes when hierarchical)
    measured_bytes: float | None = None
    shared: float = 0.0                    # the one-rank compute scaled by the cores the ranks shared here

    def features(self) -> tuple[float, float, float]:
        """(messages, shaped-link seconds at kappa = 1, bytes on an unshaped link)."""
        msgs = sum(messages(k, self.span) for k, _ in self.ops)
        b = sum(wire_bytes(k, p, self.span) for k, p in self.ops)
        return msgs, (8.0 * b / self.bps if self.bps else 0.0), (0.0 if self.bps else b)


@dataclass
class CostModel:
    alpha: float                           # seconds per message
    kappa: float                           # shaped link: seconds per byte = kappa 8 / bps
    beta_local: float                      # seconds per byte on loopback / an unshaped link
    compute: dict[str, float]              # series -> one-rank compute seconds per step
    ops: dict[str, dict[int, list[tuple[str, float]]]]   # series -> span -> its collectives (payloads) there
    hierarchical: dict[str, bool] = field(default_factory=dict)
    held_out: list[tuple[str, int, float, float]] = field(default_factory=list)   # (series, W, measured, predicted)
    worlds: tuple[int, ...] = ()           # the world sizes > 1 it was fitted on
    links: tuple[int | None, ...] = ()     # the links it was fitted on (bps; None: unshaped)
    bytes_check: list[tuple[str, int, float, float]] = field(default_factory=list)   # (series, W, counted, model)
    codec: dict[str, float] = field(default_factory=dict)   # series -> its exchange's own seconds per step
    placed: dict[tuple[str, int], float] = field(default_factory=dict)   # (series, W) -> compute with the cores shared

    def predict(self, series: str, w: int, bandwidth_bps: float | None = None, compute_s: float | None = None,
                ranks_per_node: int = 1) -> float:
        """Step seconds of `series` at w ranks (ranks_per_node each) on a link of bandwidth_bps (None: the study's
        unshaped/loopback link), compute from the study or `compute_s`."""
        c = self.compute[series] if compute_s is None else compute_s
        span = max(1, w // ranks_per_node) if self.hierarchical.get(series) else w
        if span == 1:
            return c
        kind_params = ops_at(self.ops[series], span)
        msgs = sum(messages(k, span) for k, _ in kind_params)
        b = sum(wire_bytes(k, p, span) for k, p in kind_params)
        beta = self.kappa * 8.0 / bandwidth_bps if bandwidth_bps else self.beta_local
        return c + self.codec.get(series, 0.0) + self.alpha * msgs + beta * b

    @property
    def caveats(self) -> list[str]:
        """Why its predictions may not be worth much (printed beside them)."""
        out = []
        if len(self.worlds) < 2:
            out.append(f"fitted on one world size above 1 ({', '.join(map(str, self.worlds))}): alpha (per message) "
                       "and the per-byte terms are not told apart by how they grow with W; measure two or more")
        if not any(self.links):
            out.append("no cell ran on a shaped link: predictions at other bandwidths take kappa = 1 (the wire's "
                       "nominal rate), not a measured one")
        if self.alpha == 0:
            out.append("alpha fitted to 0: these cells do not tell the per-message latency from each series' fixed "
                       "exchange cost (ranks sharing cores, CPU-bound codecs); predictions at many ranks leave latency "
                       "out: give the target network's with `study predict --alpha-us`")
        bad = [(s, w) for s, w, counted, model in self.bytes_check if model and abs(counted / model - 1) > 0.05]
        if bad:
            out.append(f"the transport counted bytes > 5% off the model's for {len(bad)} cell(s), e.g. {bad[0]}")
        return out

    @property
    def held_out_error(self) -> float | None:
        """Median |predicted / measured - 1| over the held-out cells."""
        errs = [abs(p / m - 1) for _, _, m, p in self.held_out if m > 0]
        return statistics.median(errs) if errs else None

    def describe(self) -> str:
        err = self.held_out_error
        shaped = f"kappa {self.kappa:.2f} x the shaped link's 8/bps" if any(self.links) else "no shaped link"
        codec = (f"; per-step exchange cost of each series (its codec and waits, fitted where it has 3+ cells): "
                 + ", ".join(f"{s} {e * 1e3:.1f} ms" for s, e in sorted(self.codec.items()))) if self.codec else ""
        return (f"alpha {self.alpha * 1e6:.1f} us per message, {shaped}, loopback/unshaped "
                f"{self.beta_local * 1e9:.3f} ns per byte{codec}; held-out error "
                + ("n/a (fewer than 3 cells)" if err is None else f"{err:.1%} (median over {len(self.held_out)} "
                   "cells, each predicted by the fit of the others)"))


def _median(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _points(records: list[dict]) -> tuple[dict[str, float], list[Point], dict, dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("step_s_median") is not None:
            key = (series_label(r), int(r[WORLD]), int(r.get("nodes") or 1), r.get("bandwidth") if
                   (r.get("nodes") or 1) > 1 else None)
            cells.setdefault(key, []).append(r)
    compute = {s: _median(rs, "step_s_median") for (s, w, n, _), rs in cells.items() if w == 1}
    floors = {floor_key(rs[0]): _median(rs, "step_s_median") for rs in cells.values() if is_floor(rs[0])}
    points, ops, hier = [], {}, {}
    for (s, w, n, bw), rs in cells.items():
        r0 = rs[0]
        if w == 1 or "collectives" not in r0 or s not in compute:
            continue
        hier[s] = hier.get(s, False) or bool(r0.get("hierarchical"))
        span = n if hier[s] else w
        table = ops.setdefault(s, {})
        table[span] = [tuple(o) for o in r0["collectives"]]
        for k, at in r0.get("collectives_at", {}).items():     # the same collectives at other spans (study.py)
            table.setdefault(int(k), [tuple(o) for o in at])
        if is_floor(r0):
            continue
        floor = floors.get(floor_key(r0))
        shared = compute[s] * max(1.0, 1.0 / (r0.get("cores_per_rank") or 1.0))
        c = floor if floor is not None else shared
        counted = statistics.median(x.get("bytes_per_step") or 0 for x in rs)
        # a skip floor still gathers a sharded engine's parameters: they are in c, not in the exchange
        own = table[span]
        paid = own if floor is None else [o for o in own if o[0] != "param_allgather"]
        points.append(Point(s, w, n, parse_rate(bw) if bw else None, _median(rs, "step_s_median"), c, paid, span,
                            counted, shared))
    return compute, points, ops, hier


def _design(points: list[Point], codec: list[str]) -> np.ndarray:
    """One row per point: its (messages, shaped-link seconds, unshaped bytes) and a 1 in its series' codec column."""
    return np.array([[*p.features(), *(1.0 if p.series == s else 0.0 for s in codec)] for p in points])


def _solve(points: list[Point], codec: list[str]) -> np.ndarray:
    """Non-negative least squares for (alpha, kappa, beta_local, e_s for s in codec), columns scaled to unit norm."""
    from scipy.optimize import nnls
    A = _design(points, codec)
    y = np.array([p.t - p.compute for p in points])
    norm = np.linalg.norm(A, axis=0)
    norm[norm == 0] = 1.0
    coef, _ = nnls(A / norm, y)
    return coef / norm


def fit(records: list[dict]) -> CostModel:
    """The model from a study's records; ValueError when no series has both a one-rank cell and an exchanging one."""
    compute, points, ops, hier = _points(records)
    if not points:
        raise ValueError("cost model: no series has a world-size-1 cell (its compute) and a larger one that exchanges "
                         "(with its collectives recorded); add world_size = 1 to the study's axes")
    # a series' own per-step exchange cost (encode, decode, the waits of its collectives) where it has the cells to
    # tell it from the shared terms: three or more
    count = {s: sum(p.series == s for p in points) for s in {p.series for p in points}}
    codec = sorted(s for s, n in count.items() if n >= 3)
    coef = _solve(points, codec)
    alpha, kappa, beta_local = (float(x) for x in coef[:3])
    model = CostModel(alpha, kappa if kappa > 0 else 1.0, beta_local, compute, ops, hier,
                      worlds=tuple(sorted({p.w for p in points})), links=tuple(sorted({p.bps or 0 for p in points})),
                      codec={s: float(e) for s, e in zip(codec, coef[3:])})
    model.links = tuple(b or None for b in model.links)
    model.placed = {(p.series, p.w): p.shared for p in points}
    for p in points:
        grad = [(k, b) for k, b in p.ops if k != "param_allgather"]
        if p.measured_bytes:
            model.bytes_check.append((p.series, p.w, p.measured_bytes, sum(wire_bytes(k, b, p.span) for k, b in grad)))
    if len(points) > 3 + len(codec):      # each cell predicted by the fit of all the others
        for i, p in enumerate(points):
            c = _solve(points[:i] + points[i + 1:], codec)
            c[1] = c[1] or 1.0
            model.held_out.append((p.series, p.w, p.t, p.compute + float(_design([p], codec)[0] @ c)))
    return model


def crossover_bps(model: CostModel, series: str, baseline: str, w: int, ranks_per_node: int = 1) -> float | None:
    """The highest bandwidth (bps, searched 1 Mbit/s-1 Tbit/s) below which `series` is predicted faster than
    `baseline` at w ranks: where its compression starts to pay. None where it never does, inf where it always does."""
    grid = np.logspace(6, 12, 241)
    faster = [model.predict(series, w, b, ranks_per_node=ranks_per_node)
              < model.predict(baseline, w, b, ranks_per_node=ranks_per_node) for b in grid]
    below = [b for b, f in zip(grid, faster) if f]
    if faster[-1]:
        return math.inf                   # faster on every link searched: its fixed costs are below fp32's
    return float(max(below)) if below else None


def predict_table(model: CostModel, nodes: list[int], bandwidths: list[str], compute_s: float | None = None,
                  ranks_per_node: int = 1) -> list[dict]:
    """One row per series x world size x bandwidth ("measured": the study's loopback/unshaped link)."""
    rows = []
    for series in sorted(model.ops):
        for bw in bandwidths:
            bps = None if bw == "measured" else parse_rate(bw)
            for n in nodes:
                w = n * ranks_per_node
                t = model.predict(series, w, bps, compute_s, ranks_per_node)
                c = model.compute[series] if compute_s is None else compute_s
                rows.append({"series": series, "world_size": w, "bandwidth": bw, "step_s": t,
                             "efficiency": c / t, "exchange_s": t - c})
    return rows

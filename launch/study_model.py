"""A cost model fitted to a study's cells, and its predictions past the cluster (`fieldtrain study predict`).

Per step, a cell of series s (its axes other than the world size) at W ranks takes

    t(s, W) = c_s + alpha * 2 (W - 1) + beta * b(s, W)

Hockney's alpha-beta model of a ring exchange: c_s the compute time (the series' W = 1 cell, which sends nothing),
2 (W - 1) messages per ring pass (reduce-scatter then all-gather: allreduce, or a sharded engine's reduce-scatter and
all-gather) and b(s, W) the bytes one rank sends per step, as the transport counted them (results' `bytes_per_step`).
The payload p_s = b / (2 (W - 1) / W) is the series' own: at another world size a rank sends p_s 2 (W - 1) / W
(exact for fp32; block codecs pad each rank's shard to whole blocks, a few hundred bytes per rank more).
alpha and beta are one least-squares fit over every cell with W > 1 (non-negative); its error on held-out cells is
each cell predicted by the fit of all the others. A prediction at another link swaps beta for 8 / bits-per-second;
one for another machine (a GPU) swaps c_s for its measured step compute time.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

import numpy as np

WORLD = "world_size"
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


def _label(rec: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in rec["axes"].items() if k != WORLD) or "all"


@dataclass
class CostModel:
    alpha: float                           # seconds per message
    beta: float                            # seconds per byte sent
    compute: dict[str, float]              # series -> compute seconds per step (W = 1)
    payload: dict[str, float]              # series -> bytes per step before the ring factor
    held_out: list[tuple[str, int, float, float]] = field(default_factory=list)   # (series, W, measured, predicted)

    def predict(self, series: str, w: int, bandwidth_bps: float | None = None, compute_s: float | None = None
                ) -> float:
        beta = self.beta if bandwidth_bps is None else 8.0 / bandwidth_bps
        c = self.compute[series] if compute_s is None else compute_s
        if w == 1:
            return c
        return c + self.alpha * 2 * (w - 1) + beta * self.payload[series] * ring(w)

    worlds: tuple[int, ...] = ()          # the world sizes > 1 it was fitted on

    @property
    def caveats(self) -> list[str]:
        """Why its predictions may not be worth much (printed beside them)."""
        out = []
        if len(self.worlds) < 2:
            out.append(f"fitted on one world size above 1 ({', '.join(map(str, self.worlds))}): alpha (per message) "
                       "and beta (per byte) are not told apart by how they grow with W; measure two or more")
        if self.beta == 0 or self.alpha == 0:
            out.append("a term fitted negative was dropped (alpha or beta = 0): the measured exchange does not "
                       "grow with bytes or messages as the model assumes (CPU-bound codecs, ranks sharing cores)")
        return out

    @property
    def held_out_error(self) -> float | None:
        """Median |predicted / measured - 1| over the held-out cells."""
        errs = [abs(p / m - 1) for _, _, m, p in self.held_out if m > 0]
        return statistics.median(errs) if errs else None


def _points(records: list[dict]) -> tuple[dict[str, float], dict[str, float], list[tuple[str, int, float, float]]]:
    """Per series its compute (median W = 1 step) and payload; the (series, W, step, bytes) of each W > 1 cell."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("step_s_median") is not None:
            cells.setdefault((_label(r), int(r[WORLD])), []).append(r)
    compute = {s: statistics.median(x["step_s_median"] for x in rs) for (s, w), rs in cells.items() if w == 1}
    points, payload = [], {}
    for (s, w), rs in cells.items():
        if w > 1 and s in compute:
            b = statistics.median(x.get("bytes_per_step") or 0 for x in rs)
            points.append((s, w, statistics.median(x["step_s_median"] for x in rs), b))
            payload.setdefault(s, b / ring(w))
    return compute, payload, points


def _solve(points, compute) -> tuple[float, float]:
    A = np.array([[2.0 * (w - 1), b] for _, w, _, b in points])
    y = np.array([t - compute[s] for s, _, t, _ in points])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    if (coef < 0).any():                  # non-negative: refit the other term alone
        keep = int(np.argmax(coef))
        coef = np.zeros(2)
        col = A[:, keep]
        coef[keep] = max(0.0, float(col @ y / (col @ col))) if col @ col > 0 else 0.0
    return float(coef[0]), float(coef[1])


def fit(records: list[dict]) -> CostModel:
    """The model from a study's records; ValueError when no series has both a W = 1 cell and a W > 1 cell."""
    compute, payload, points = _points(records)
    if not points:
        raise ValueError("cost model: no series has a world-size-1 cell (its compute) and a larger one (its exchange); "
                         "add world_size = 1 to the study's axes")
    alpha, beta = _solve(points, compute)
    model = CostModel(alpha, beta, compute, payload, worlds=tuple(sorted({w for _, w, _, _ in points})))
    if len(points) > 2:                   # each cell predicted by the fit of all the others
        for i, (s, w, t, b) in enumerate(points):
            a_i, b_i = _solve(points[:i] + points[i + 1:], compute)
            model.held_out.append((s, w, t, compute[s] + a_i * 2 * (w - 1) + b_i * b))
    return model


def predict_table(model: CostModel, nodes: list[int], bandwidths: list[str], compute_s: float | None = None
                  ) -> list[dict]:
    """One row per series x world size x bandwidth ("measured": the study's own link)."""
    rows = []
    for series in sorted(model.payload):
        for bw in bandwidths:
            bps = None if bw == "measured" else parse_rate(bw)
            for w in nodes:
                t = model.predict(series, w, bps, compute_s)
                c = model.compute[series] if compute_s is None else compute_s
                rows.append({"series": series, "world_size": w, "bandwidth": bw, "step_s": t,
                             "efficiency": c / t, "exchange_s": t - c})
    return rows

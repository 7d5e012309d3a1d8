"""Reduce-scatter forms of the gradient compressors, for sharded engines (FSDP2, ZeRO-3).

Every rank passes a flat fp32 buffer of W*S floats; row k = flat.view(W, S)[k] is the part rank k owns,
and rank r gets back the (approximate) mean over ranks of row r. fp32/fp16/bf16 go through one reduce-scatter
collective; the compressed forms ship every other rank's row compressed and add their own row r, which never
crosses the wire, exact: with x_i = flat_i (+ e_i, the residual, with error feedback) on rank i, rank r returns

    none      (1/W) sum_i x_i[r]                                  fp32 reduce-scatter
    fp16/bf16 sum_i fl(x_i[r] / W)                                 cast, reduce-scatter, cast back
    skip      flat_r[r]                                            no exchange (compute-floor benchmarks)
    others    (1/W) (x_r[r] + sum_{i != r} C(x_i[r])),  summed in fp32 in rank order (integers are never summed):
      int8/int4  C = D(Q(.)), Q blockwise absmax with stochastic rounding (kernels.encode_blockwise), codes
                 + fp32 scales, all-to-all
      sign       C(v) = (||v||_1 / S) sign(v), 1-bit Adam's scaled sign (Tang et al. 2021), one scale per row,
                 sign bits + scale, all-to-all
      topk       C = TopK_k, k = ceil(topk.density * S) per row: (value, int32 index) pairs, all-to-all
      randk      EF21 below; with randk.unbiased C = (S/k) RandK_k, indices per rank, pairs, all-to-all

Top-k and rand-k select per row and all-to-all the pairs: an allgather of a global top-k would ship each pair
to W-1 ranks of which only its row's owner uses it (W times the bytes).

Error feedback (int8, int4, sign, topk): Seide et al. 2014 / Stich et al. 2018 ("Sparsified SGD with
Memory"), per buffer `key`:  x_i = flat_i + e_i;  e_i <- x_i - C(x_i)  (row i of e_i stays 0).

EF21 for rand-k (Richtárik, Sokolov, Fatkhullin 2021, "EF21: A New, Simpler, Theoretically Better, and
Practically Faster Error Feedback"), per row r and buffer:

    worker i (i != r):  c_i = C_i(x_i[r] - g_i[r]);   g_i[r] <- g_i[r] + c_i
    owner r:            H <- H + (1/W) sum_{i != r} c_i;  return H + x_r[r] / W

so H = (1/W) sum_{i != r} g_i[r] always, and with a contractive C_i (unscaled rand-k:
E ||C(v) - v||^2 = (1 - k/S) ||v||^2) each g_i tracks x_i.

`comm.ef_state` says where that state lives, per buffer of W*S floats (memory in `ef_state_bytes`):

    "full"     fp32 residual e_i (4 W S bytes); EF21: g_i and H (4 W S + 4 S)
    "bf16"     e_i stored in bf16 (2 W S). EF21: g_i in bf16 (2 W S) + H in fp32 (4 S); to keep
               H = mean g_i exact, worker i sends c_i = bf16(g_i + v) - g_i instead of v, so g_i + c_i lands
               on the bf16 grid with no rounding (an unrounded bf16 g_i would random-walk away from H)
    "sharded"  EF21 with one rand-k projection P_t shared by every rank (same indices: seeded by the run seed,
               buffer key and call count, not the rank). C_i = P_t is linear and the same on every rank, so
               sum_{i != r} c_i = P_t(sum_{i != r} x_i[r] - W H), and the owner's recursion needs no g_i:
                   H <- H + P_t((1/W) sum_{i != r} x_i[r] - H)
               i.e. H's k coordinates in P_t are refreshed with the other ranks' exact mean, the rest kept.
               This IS EF21 (with a shared rand-k compressor, delta = k/S), holding 4 S bytes: 1/(W+1) of
               "full"; the message is k values per row (indices need not travel), reduce-scattered in fp32.
               Inside EF21's step-size bound it matches "full" (independent P_i); above it the W-1 other ranks'
               parts of H go stale together and it is less stable (docs/scatter_compressors.md).
               int8/int4 keep no state under "sharded": stochastic rounding is unbiased, E D(Q(x)) = x, so
               the mean is unbiased without error feedback. A residual for a biased compressor (top-k, sign)
               holds what was not sent, which only its sender knows: it cannot be sharded, and "sharded" is
               refused for them (use "bf16").

State is transactional as in trainer/compress/base.py (pending until `end_step(applied)`), per rank
("local", checkpointed under f"rank{r}") and dropped with a logged warning when the world size changes.
"""

from __future__ import annotations

import logging
import math
import time
import zlib

import torch

from kernels import decode_blockwise, encode_blockwise, encode_signs, scatter_dense, topk_select, unpack_signs
from trainer.comm import ExchangeStats, restore_compressor_state, save_compressor_state
from trainer.compress import COMPRESSORS
from trainer.compress.base import Compressor, as_bytes, from_bytes, mixed_seed
from trainer.compress.transport import CountingTransport, make_transport
from trainer.config import CommConfig

log = logging.getLogger("fieldtrain")


# ---- the forms ------------------------------------------------------------------------------------------------
class ScatterCompressor(Compressor):
    """Base: `reduce_scatter(flat (W*S,), key) -> (S,)`; state through Compressor's transactional get/put."""

    name = "none"
    ef_states: tuple[str, ...] = ("full", "bf16", "sharded")   # what comm.ef_state may be for this form
    encode_share = 1.0   # of the allreduce compressor's measured encode (the quantisers: one pass, not two)

    def __init__(self, cfg: CommConfig, transport, seed: int = 0):
        super().__init__(cfg, transport)
        self.seed = seed

    # ---- cost model (`auto`, choose_scatter_compressor) ----
    def scatter_ops(self, numel: int, w: int) -> list[tuple[str, int]]:
        """(collective, payload bytes) one reduce_scatter of a W*S = numel buffer issues: exactly what this form
        passes to the transport (CountingTransport then counts (W-1)/W of each, reduce_scatter like all_to_all)."""
        return [("reduce_scatter", 4 * numel)]

    @classmethod
    def encode_seconds(cls, cfg, n: int) -> float:
        return cls.encode_share * COMPRESSORS[cls.name].encode_seconds(cfg, n)

    @property
    def ef(self) -> bool:
        """Whether this form keeps error-feedback state at all (its own settings say)."""
        return False

    def reduce_scatter(self, flat: torch.Tensor, key: str) -> torch.Tensor:
        raise NotImplementedError

    # ---- helpers ----
    def rows(self, flat: torch.Tensor) -> tuple[int, int, int, torch.Tensor]:
        W = self.transport.world_size
        return W, self.transport.rank, flat.numel() // W, flat.view(W, -1)

    def load_state(self, key: str, shape: tuple) -> torch.Tensor | None:
        """State `key` as fp32 (a copy, safe to update in place), or None if absent or of another shape."""
        t = self.get(key)
        return t.float().clone() if t is not None and tuple(t.shape) == tuple(shape) else None

    def store_state(self, key: str, value: torch.Tensor) -> None:
        self.put(key, value.to(torch.bfloat16) if self.cfg.ef_state == "bf16" else value.clone())

    def generator(self, key: str, device: torch.device, shared: bool) -> torch.Generator:
        """Seeded by (run seed, key, this key's call count[, rank]): deterministic, resumable (the counter is
        replicated state: checkpointed, rolled back), the same on every rank when `shared`."""
        calls = self.get(key + "/calls", local=False)
        count = 0 if calls is None else int(calls)
        self.put(key + "/calls", torch.tensor(count + 1, dtype=torch.int64), local=False)
        g = torch.Generator(device=device)
        g.manual_seed(mixed_seed(self.seed, zlib.crc32(key.encode()), count, -1 if shared else self.transport.rank))
        return g


def _sum_rows(rows: torch.Tensor) -> torch.Tensor:
    """(W, m) -> (m,), added in rank order (bit-identical however the rows arrived)."""
    acc = rows[0].clone()
    for row in rows[1:]:
        acc += row
    return acc


class NoneScatter(ScatterCompressor):
    """Exact fp32 reduce-scatter, then / W."""
    name = "none"

    def reduce_scatter(self, flat, key):
        W, _, _, x = self.rows(flat)
        return self.transport.reduce_scatter(x).div_(W)


class HalfScatter(ScatterCompressor):
    """Cast x / W to fp16 (or bf16) so the sum cannot overflow, reduce-scatter, cast back. No error feedback."""
    name, dtype = "fp16", torch.float16

    def scatter_ops(self, numel, w):
        return [("reduce_scatter", 2 * numel)]

    def reduce_scatter(self, flat, key):
        W, _, _, x = self.rows(flat)
        return self.transport.reduce_scatter(x.div(W).to(self.dtype)).float()


class BF16Scatter(HalfScatter):
    name, dtype = "bf16", torch.bfloat16


class SkipScatter(ScatterCompressor):
    """No exchange: this rank's own row of its own gradient."""
    name = "skip"

    def scatter_ops(self, numel, w):
        return []

    def reduce_scatter(self, flat, key):
        _, r, _, x = self.rows(flat)
        return x[r].clone()


class ResidualScatter(ScatterCompressor):
    """A compressor C per row with error feedback e_i <- x_i - C(x_i); subclasses give C's message."""

    ef_states = ("full", "bf16")

    @property
    def ef(self) -> bool:
        return self.cfg.error_feedback

    def encode(self, x: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """x (W, S) -> (message (W, m) of bytes or int32 with row j for rank j, C(x) (W, S) as decoded)."""
        raise NotImplementedError

    def decode(self, msg: torch.Tensor, S: int) -> torch.Tensor:
        """Received (W, m) -> (W, S): row j = C(x_j[r]) as rank j sent it."""
        raise NotImplementedError

    def reduce_scatter(self, flat, key):
        W, r, S, x = self.rows(flat)
        if self.ef:
            e = self.load_state(key + "/e", (W, S))
            x = x + e if e is not None else x.clone()
        msg, sent = self.encode(x, key)
        if self.ef:
            residual = x - sent
            residual[r] = 0                       # the own row is used exact
            self.store_state(key + "/e", residual)
        got = self.decode(self.transport.all_to_all(msg), S)
        got[r] = x[r]
        return _sum_rows(got).div_(W)


class QuantScatter(ResidualScatter):
    """Blockwise absmax int8/int4 codes + fp32 scales; rows padded to whole blocks (whole bytes for int4)."""

    name, bits = "int8", 8
    ef_states = ("full", "bf16", "sharded")
    encode_share = 0.5

    def scatter_ops(self, numel, w):
        Sp = self.padded(numel // w)
        return [("all_to_all", w * (Sp * self.bits // 8 + 4 * (Sp // self.block)))]

    @property
    def ef(self) -> bool:   # "sharded": no residual, stochastic rounding is unbiased
        return self.cfg.error_feedback and self.cfg.ef_state != "sharded"

    @property
    def block(self) -> int:
        return self.cfg.options(self.name).block_size

    def padded(self, S: int) -> int:
        return -(-S // self.block) * self.block      # whole blocks (int4's are even: whole bytes)

    def encode(self, x, key):
        W, S = x.shape
        Sp, B = self.padded(S), self.block
        xp = torch.zeros(W, Sp, dtype=torch.float32, device=x.device)
        xp[:, :S] = x
        codes, s = encode_blockwise(xp.view(-1), self.bits, B, stochastic=True,
                                    generator=self.generator(key, x.device, shared=False))
        decoded = decode_blockwise(codes, s, W * Sp, self.bits, B).view(W, Sp)[:, :S]
        return torch.cat([codes.view(W, -1), as_bytes(s.view(W, Sp // B))], dim=1), decoded

    def decode(self, msg, S):
        W, Sp = msg.shape[0], self.padded(S)
        code_bytes = Sp * self.bits // 8
        codes, scales = msg[:, :code_bytes].reshape(-1), from_bytes(msg[:, code_bytes:], torch.float32)
        return decode_blockwise(codes, scales.reshape(-1), W * Sp, self.bits, self.block).view(W, Sp)[:, :S]


class Int4Scatter(QuantScatter):
    name, bits = "int4", 4


class SignScatter(ResidualScatter):
    """Scaled sign per row: S/8 bytes of sign bits (rows padded to whole bytes) + one fp32 scale."""
    name = "sign"
    encode_share = 0.5

    def scatter_ops(self, numel, w):
        return [("all_to_all", w * (-(-(numel // w) // 8) + 4))]

    def encode(self, x, key):
        W, S = x.shape
        Sp = -(-S // 8) * 8
        xp = torch.zeros(W, Sp, dtype=torch.float32, device=x.device)
        xp[:, :S] = x
        bits, l1 = zip(*(encode_signs(row) for row in xp))
        scale = (torch.stack(l1) / max(S, 1)).float().view(W, 1)                      # mean |x| per row
        c = (xp[:, :S] >= 0).to(torch.float32).mul_(2).sub_(1).mul_(scale)       # +-scale (sign(0) = +), exactly
        return torch.cat([torch.stack(bits), as_bytes(scale)], dim=1), c

    def decode(self, msg, S):
        W, nb = msg.shape[0], -(-S // 8)
        scale = from_bytes(msg[:, nb:], torch.float32)                                  # (W, 1)
        return (unpack_signs(msg[:, :nb].reshape(-1), W * nb * 8).view(W, -1)[:, :S] * scale).contiguous()


def _density_k(cfg, name: str, S: int) -> int:
    return min(max(math.ceil(cfg.options(name).density * S), 1), S)


def _pairs(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(W, k) fp32 values and (W, k) indices -> (W, 2k) int32 message."""
    return torch.cat([values.float().contiguous().view(torch.int32), indices.to(torch.int32)], dim=1)


def _unpairs(got: torch.Tensor, S: int, scale: float = 1.0) -> torch.Tensor:
    """(W, 2k) int32 pairs -> (W, S) dense rows."""
    k = got.shape[1] // 2
    vals, idx = from_bytes(got[:, :k], torch.float32), got[:, k:]
    out = torch.zeros(got.shape[0], S, dtype=torch.float32, device=got.device)
    for j in range(got.shape[0]):
        scatter_dense(S, idx[j], vals[j] * scale if scale != 1.0 else vals[j], out=out[j])
    return out


class TopKScatter(ResidualScatter):
    """The k = ceil(topk.density * S) largest |x| of each row, with error feedback."""
    name = "topk"

    def scatter_ops(self, numel, w):
        return [("all_to_all", w * 2 * _density_k(self.cfg, self.name, numel // w) * 4)]

    def encode(self, x, key):
        W, S = x.shape
        k = _density_k(self.cfg, self.name, S)
        picked = [topk_select(row, k) for row in x]
        vals, idx = torch.stack([v for v, _ in picked]), torch.stack([i for _, i in picked])
        sent = torch.zeros_like(x).scatter_(1, idx.long(), vals)
        return _pairs(vals, idx), sent

    def decode(self, msg, S):
        return _unpairs(msg, S)


class RandKScatter(ScatterCompressor):
    """EF21 with rand-k (k = ceil(randk.density * S) per row), or with randk.unbiased the (S/k)-scaled mean."""
    name = "randk"

    @property
    def ef(self) -> bool:
        return self.cfg.error_feedback and not self.cfg.randk.unbiased

    def scatter_ops(self, numel, w):
        k = _density_k(self.cfg, self.name, numel // w)
        return [("reduce_scatter", w * k * 4)] if self.ef and self.cfg.ef_state == "sharded" else \
            [("all_to_all", w * 2 * k * 4)]

    def reduce_scatter(self, flat, key):
        W, r, S, x = self.rows(flat)
        k = _density_k(self.cfg, self.name, S)
        own = x[r] / W
        if self.ef and self.cfg.ef_state == "sharded":
            # EF21 with a shared P_t: H <- H + P_t(mean_{i != r} x_i[r] - H) (module docstring)
            idx = torch.randperm(S, generator=self.generator(key, x.device, shared=True), device=x.device)[:k]
            idx = idx.sort().values
            vals = x[:, idx].clone()
            vals[r] = 0
            others = self.transport.reduce_scatter(vals).div_(W)                  # (k,): mean_{i != r} x_i[r][idx]
            H = self.load_state(key + "/H", (S,))
            H = torch.zeros(S, dtype=torch.float32, device=x.device) if H is None else H
            H[idx] = others
            self.store_state_fp32(key + "/H", H)
            return H + own

        idx = torch.randperm(S, generator=self.generator(key, x.device, shared=False), device=x.device)[:k]
        idx = idx.sort().values.expand(W, k)
        if not self.ef:
            scale = S / k if self.cfg.randk.unbiased else 1.0     # plain unscaled rand-k as RandKCompressor
            got = _unpairs(self.transport.all_to_all(_pairs(x.gather(1, idx), idx)), S, scale=scale)
            got[r] = x[r]
            return _sum_rows(got).div_(W)

        # EF21 with independent indices; g_i (W, S) on every worker, H (S,) at the owner
        g_i = self.load_state(key + "/g_i", (W, S))
        g_i = torch.zeros(W, S, dtype=torch.float32, device=x.device) if g_i is None else g_i
        old = g_i.gather(1, idx)
        v = x.gather(1, idx) - old
        if self.cfg.ef_state == "bf16":
            v = (old + v).to(torch.bfloat16).float() - old                         # g_i + c_i on the bf16 grid
        v[r] = 0                                                                   # own row: unused, stays 0
        g_i.scatter_(1, idx, old + v)
        self.store_state(key + "/g_i", g_i)
        got = _unpairs(self.transport.all_to_all(_pairs(v, idx)), S)
        got[r] = 0
        H = self.load_state(key + "/H", (S,))
        H = torch.zeros(S, dtype=torch.float32, device=x.device) if H is None else H
        H += _sum_rows(got).div_(W)
        self.store_state_fp32(key + "/H", H)
        return H + own

    def store_state_fp32(self, key: str, value: torch.Tensor) -> None:
        """H stays fp32 under every ef_state: rounding it would let it drift from mean g_i."""
        self.put(key, value.clone())


FORMS: dict[str, type[ScatterCompressor]] = {
    "none": NoneScatter, "fp16": HalfScatter, "bf16": BF16Scatter, "int8": QuantScatter, "int4": Int4Scatter,
    "sign": SignScatter, "topk": TopKScatter, "randk": RandKScatter, "skip": SkipScatter,
}
# comm.compressor values with a reduce-scatter form.
# PowerSGD has none: see docs/scatter_compressors.md.
SCATTER_COMPRESSORS: tuple[str, ...] = tuple(n for n in FORMS if n in COMPRESSORS) + ("auto",)


def check_scatter_config(cfg: CommConfig, name: str | None = None) -> None:
    """ValueErrors for a compressor/ef_state pair without a reduce-scatter form."""
    name = name or cfg.compressor
    if name not in SCATTER_COMPRESSORS:
        raise ValueError(f"config key 'comm.compressor' = {name!r} has no reduce-scatter form (sharded engines); "
                         f"allowed: {', '.join(map(repr, SCATTER_COMPRESSORS))}")
    form = FORMS.get(name)
    if form is not None and cfg.ef_state not in form.ef_states and form(cfg, _NoTransport()).ef:
        raise ValueError(f"config key 'comm.ef_state' = {cfg.ef_state!r} cannot carry {name}'s error feedback "
                         f"(a biased compressor's residual lives with its sender); allowed for {name}: "
                         f"{', '.join(map(repr, form.ef_states))}, or comm.error_feedback = false")


class _NoTransport:
    rank, world_size, name = 0, 1, "none"


# ---- cost model (`auto`) ----------------------------------------------------------------------------------------
def scatter_collectives(name: str, cfg: CommConfig, numel: int, w: int) -> list[tuple[str, int]]:
    """(collective, payload bytes) one reduce_scatter of form `name` issues (its own `scatter_ops`)."""
    if name not in FORMS:
        raise ValueError(f"comm.auto_candidates: no reduce-scatter cost model for {name!r}")
    return FORMS[name](cfg, _NoTransport()).scatter_ops(numel, w)


def wire_bytes(ops: list[tuple[str, int]], w: int) -> int:
    """Bytes this rank puts on the wire for `ops`, as CountingTransport counts them."""
    per = {"reduce_scatter": lambda b: (w - 1) * b // w, "all_to_all": lambda b: (w - 1) * b // w,
           "allgather": lambda b: (w - 1) * b, "allreduce": lambda b: 2 * (w - 1) * b // w}
    return sum(per[kind](b) for kind, b in ops)


def choose_scatter_compressor(cfg: CommConfig, transport, numel: int, buffers: int = 1) -> str:
    """The candidate (cfg.auto_candidates that have a scatter form and fit cfg.ef_state) with the least predicted
    time for `buffers` reduce-scatters of numel/buffers floats each, on the link measured by `measure_link`
    (Hockney alpha-beta; a ring reduce-scatter and an all-to-all both cost (W-1) alpha + (W-1)/W b beta)."""
    from trainer.compress.auto import _collective_time, encode_costs, log_choice, measure_link
    w = transport.world_size
    per = max(numel // buffers // w, 1) * w
    candidates = []
    for name in cfg.auto_candidates:
        try:
            check_scatter_config(cfg, name)
        except ValueError:
            continue
        candidates.append(name)
    if not candidates:
        raise ValueError(f"config key 'comm.auto_candidates' = {cfg.auto_candidates!r}: none has a reduce-scatter "
                         f"form under comm.ef_state = {cfg.ef_state!r}; allowed: "
                         f"{', '.join(map(repr, [n for n in SCATTER_COMPRESSORS if n not in ('auto', 'skip')]))}")
    alpha, beta = measure_link(transport)
    # one quantise (not auto's worker + server two) per call: half of auto's measured encode time
    encode = encode_costs([FORMS[c] for c in candidates], cfg, numel, transport)
    rows = []
    for name, enc in zip(candidates, encode):
        ops = scatter_collectives(name, cfg, per, w)
        kinds = [("all_to_all" if k == "reduce_scatter" else k, b) for k, b in ops]
        comm = buffers * sum(_collective_time(k, b, w, alpha, beta) for k, b in kinds)
        rows.append((comm + enc, name, comm, enc, buffers * wire_bytes(ops, w)))
    return log_choice(rows, f"auto reduce-scatter compressor: link alpha {alpha * 1e6:.1f} us, "
                            f"{8 / beta / 1e9:.3f} Gbit/s over {w} ranks, {numel} floats in {buffers} buffer(s)")


# ---- the engine-facing state ------------------------------------------------------------------------------------
class _Undecided:
    """`auto` before its choice: no state yet."""
    name = "auto"

    def state_dict(self) -> dict:
        return {"local": {}, "replicated": {}}


class ScatterExchange:
    """Engine-facing state object for sharded engines; mirrors trainer/comm.py GradientExchange.

    `numel`/`buffers`: the gradient floats per step and how many reduce-scatters carry them, for `auto`'s choice at
    construction (a collective: construct on every rank). Without `numel`, `auto` decides at the first
    reduce_scatter from that buffer's size."""

    def __init__(self, cfg: CommConfig, seed: int = 0, transport=None, numel: int | None = None, buffers: int = 1):
        check_scatter_config(cfg)
        self.cfg, self.seed, self.buffers = cfg, seed, buffers
        transport = transport if transport is not None else make_transport(cfg.transport)
        self.transport = transport if isinstance(transport, CountingTransport) else CountingTransport(transport)
        self.stats = ExchangeStats()
        self.local_nonfinite = False
        self.step = 0
        self.warmup = NoneScatter(cfg, self.transport)     # fp32 for the first cfg.start_step steps
        self._deferred_state: dict | None = None
        self.compressor: ScatterCompressor | _Undecided = _Undecided()
        if cfg.compressor != "auto":
            self.compressor = self._build(cfg.compressor)
        elif numel is not None:
            self.compressor = self._build(choose_scatter_compressor(cfg, self.transport, numel, buffers))

    def _build(self, name: str) -> ScatterCompressor:
        return FORMS[name](self.cfg, self.transport, self.seed)

    def reduce_scatter(self, flat: torch.Tensor, key: str) -> torch.Tensor:
        """flat: 1-D float32 (W*S,) on every rank; returns this rank's (S,) fp32 mean of row `rank`. Every rank must
        call with the same keys and sizes in the same order."""
        W = self.transport.world_size
        assert flat.dim() == 1 and flat.dtype == torch.float32 and flat.numel() % W == 0, \
            f"reduce_scatter wants a 1-D float32 buffer of W*S floats (W={W}), got {flat.dtype} {tuple(flat.shape)}"
        if isinstance(self.compressor, _Undecided):
            name = choose_scatter_compressor(self.cfg, self.transport, flat.numel() * self.buffers, self.buffers)
            self.compressor = self._build(name)
            if self._deferred_state is not None:
                self.load_state_dict(self._deferred_state)
        if not bool(torch.isfinite(flat).all()):
            self.local_nonfinite = True
        compressor = self.warmup if self.step < self.cfg.start_step else self.compressor
        before, t0 = self.transport.bytes_sent, time.perf_counter()
        out = compressor.reduce_scatter(flat.detach(), key)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.bytes_sent += self.transport.bytes_sent - before
        self.stats.bytes_uncompressed += (W - 1) * 4 * flat.numel() // W
        return out

    def end_step(self, applied: bool) -> None:
        if not isinstance(self.compressor, _Undecided):
            (self.compressor.commit if applied else self.compressor.rollback)()
        self.local_nonfinite = False
        if applied:
            self.step += 1

    # ---- Stateful (the layout of GradientExchange's) ----
    def state_dict(self) -> dict:
        return save_compressor_state(self.compressor, self.transport, self.step, ef_state=self.cfg.ef_state)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if isinstance(self.compressor, _Undecided):   # auto decides at the first reduce_scatter
            self._deferred_state = state
            return
        self._deferred_state = None
        if state["compressor"] != self.compressor.name or state.get("ef_state", self.cfg.ef_state) != self.cfg.ef_state:
            log.warning("checkpoint's reduce-scatter compressor was %s (ef_state %s), this run uses %s (%s): "
                        "starting its state afresh", state["compressor"], state.get("ef_state"),
                        self.compressor.name, self.cfg.ef_state)
            return
        restore_compressor_state(self.compressor, self.transport, state)

    def per_rank_keys(self) -> list[str]:
        return [f"rank{self.transport.rank}"]

    def optional_keys(self) -> list[str]:
        """What DDP's GradientExchange checkpoints lack (CheckpointManager.load skips these when absent)."""
        return ["ef_state"]


def ef_state_bytes(exchange: ScatterExchange) -> int:
    """Bytes of error-feedback state this rank holds (committed residuals and EF21 estimates; not RNG counters)."""
    comp = exchange.compressor
    return 0 if isinstance(comp, _Undecided) else sum(t.numel() * t.element_size() for t in comp.local.values())

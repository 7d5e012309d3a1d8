"""Blockwise int8/int4 gradient exchange without integer overflow, with worker and server error feedback.

Integers cannot be summed by an allreduce (int8 overflows, and each rank has its own scales), so the
exchange is a reduce-scatter done by hand, as in ZeRO++'s qgZ / 1-bit Adam's two phases:

    x = grad + e_w;  q, s = Q(x);  e_w = x - D(q, s)              worker, error feedback per parameter
    all_to_all: rank r receives every rank's codes+scales of shard r
    y = mean_j D(q_j, s_j) + e_s;  q', s' = Q(y);  e_s = y - D(q', s')   server of shard r (fp32 average)
    allgather q', s';  every rank decodes the same W shards -> identical result everywhere

Q is `kernels.encode_blockwise` (blockwise quantisation with stochastic rounding, int4 packed two per byte;
unbiased when error feedback is off), D is `kernels.decode_blockwise`.
The bucket is padded to W equal shards of whole blocks so blocks never straddle two shards.
"""

from __future__ import annotations

import torch

from kernels import decode_blockwise, encode_blockwise, encode_with_residual
from trainer.compress.base import (Compressor, GradientPlan, ParamView, add_bucket_state_, as_bytes, call_generator,
                                   from_bytes, local_exchange_seconds, mean_rows_, put_bucket_state, shard_length)

# ---- the compressor -----------------------------------------------------------------------------------------
class QuantizedCompressor(Compressor):
    """Blockwise absmax quantisation to `bits` (8 or 4) with a two-phase exchange; see the module docstring."""

    name = "int8"
    bits = 8
    error_feedback = True
    cost_model = True

    @classmethod
    def collectives(cls, cfg, plan: GradientPlan, w: int) -> list[tuple[str, float]]:
        """Phase 1 all-to-all of every shard's codes + scales, phase 2 allgather of this rank's re-quantised shard."""
        per = plan.n * cls.bits / 8 + 4 * plan.n / cfg.options(cls.name).block_size
        return [("all_to_all", per), ("allgather", per / w)]

    @classmethod
    def encode_seconds(cls, cfg, n: int) -> float:
        """Worker and server side, error feedback included: the whole exchange on a world of one."""
        return local_exchange_seconds(cls, cfg, n)

    def __init__(self, cfg, transport, bits: int | None = None):
        super().__init__(cfg, transport)
        self.bits = bits or self.bits
        if self.bits not in (4, 8):
            raise ValueError(f"QuantizedCompressor bits = {self.bits!r}; allowed: 4, 8")
        self.name = f"int{self.bits}"
        self.block = cfg.options(self.name).block_size

    def _encode(self, codes: torch.Tensor, s: torch.Tensor, rows: int) -> torch.Tensor:
        """Flat codes (rows whole shards) and scales -> (rows, bytes) uint8, each row its codes then its scales."""
        return torch.cat([codes.view(rows, -1), as_bytes(s.view(rows, -1))], dim=1)

    def _decode(self, msg: torch.Tensor, shard: int) -> torch.Tensor:
        """(rows, bytes) uint8 -> the dequantised (rows, shard) float32."""
        rows, code_bytes = msg.shape[0], shard * self.bits // 8
        codes, scales = msg[:, :code_bytes].reshape(-1), from_bytes(msg[:, code_bytes:], torch.float32)
        return decode_blockwise(codes, scales.reshape(-1), rows * shard, self.bits, self.block).view(rows, shard)

    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> torch.Tensor:
        W, B, n, ef = self.transport.world_size, self.block, grad.numel(), self.cfg.error_feedback
        shard = shard_length(n, W, B)     # whole blocks: each rank's codes are a contiguous run of bytes
        gen = call_generator(self, grad.device)

        x = torch.empty(W * shard, dtype=torch.float32, device=grad.device)
        x[:n] = grad
        x[n:] = 0
        if ef:     # the residual x - D(Q(x)) comes from the codes' own pass and is kept without a copy
            add_bucket_state_(self, views, "/e", x[:n])
            codes, s, residual = encode_with_residual(x, self.bits, B, generator=gen)
            put_bucket_state(self, views, "/e", residual[:n], copy=False)
        else:
            codes, s = encode_blockwise(x, self.bits, B, generator=gen)

        # phase 1: row j of `to_servers` is shard j, for rank j to average
        to_servers = self._encode(codes, s, W)
        mine = self._decode(self.transport.all_to_all(to_servers), shard)       # (W, shard): every rank's shard r
        y = mean_rows_(mine)                                                      # mine is this call's own buffer
        key = f"server{W}/" + "|".join(v.name for v in views)   # this rank's shard of this bucket layout
        if ef:
            e_s = self.get(key)
            if e_s is not None and e_s.shape == y.shape:
                y += e_s
            codes2, s2, residual = encode_with_residual(y, self.bits, B, generator=gen)
            self.put(key, residual)
        else:
            codes2, s2 = encode_blockwise(y, self.bits, B, generator=gen)

        # phase 2: everyone gets every averaged shard, decoded straight into grad
        from_server = self._encode(codes2, s2, 1)[0]
        gathered = self.transport.allgather(from_server)
        if grad.dtype != torch.float32 or not grad.is_contiguous():
            return grad.copy_(self._decode(gathered, shard).reshape(-1)[:n])
        code_bytes, bits = shard * self.bits // 8, self.bits
        scales = from_bytes(gathered[:, code_bytes:], torch.float32)              # (W, shard / B)
        for j in range(W):
            lo, hi = j * shard, min(n, (j + 1) * shard)
            full = max(hi - lo, 0) // B * B                   # whole blocks; a partial last one is decoded whole
            if full:
                decode_blockwise(gathered[j, :full * bits // 8], scales[j, :full // B], full, bits, B,
                                 out=grad[lo:lo + full])
            if lo + full < hi:
                last = decode_blockwise(gathered[j, full * bits // 8:(full + B) * bits // 8],
                                        scales[j, full // B:full // B + 1], B, bits, B)
                grad[lo + full:hi] = last[:hi - lo - full]
        return grad


class Int8Compressor(QuantizedCompressor):
    name, bits = "int8", 8


class Int4Compressor(QuantizedCompressor):
    name, bits = "int4", 4

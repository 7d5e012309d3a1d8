"""1-bit scaled-sign exchange with worker and server error feedback: the two phases of 1-bit Adam.

Tang et al. 2021, "1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence
Speed", Algorithm 1's compressed allreduce, with the bucket split into W shards (one scale per shard):

    worker i:  x = grad + e_w;  c_i = (||x||_1 / |x|) sign(x) per shard;  e_w = x - c_i
    all_to_all: rank r receives every rank's sign bits (8 per byte) + scale of shard r
    server r:  y = mean_j c_j + e_s;  c_s = (||y||_1 / |y|) sign(y);  e_s = y - c_s
    allgather c_s bits + scale;  every rank decodes the same full vector

The scale ||x||_1/|x| makes c the best multiple of sign(x) in l2 and a contraction:
||x - c||^2 = ||x||^2 - ||x||_1^2 / |x| <= (1 - 1/|x|) ||x||^2. sign(0) = +1 (`pack_signs`: bit = x >= 0).
Padding (up to 8 W - 1 elements to whole bytes) is masked out of the scales and the residuals.
"""

from __future__ import annotations

import torch

from kernels import encode_signs, sign_residual, unpack_signs
from trainer.compress.base import (Compressor, GradientPlan, ParamView, add_bucket_state_, as_bytes, from_bytes,
                                   local_exchange_seconds, mean_rows_, put_bucket_state, shard_length)


def _sign_message(x: torch.Tensor, valid: int) -> torch.Tensor:
    """Rows of x (rows, m), m a multiple of 8, whose entries past the first `valid` (row-major) are 0 -> (rows, m/8 + 4)
    uint8: each row's sign bits, then its scale = mean |x| over the row's valid entries (float32 bytes; the sum in
    float64, `kernels.encode_signs`, the zero padding adds nothing)."""
    rows, m = x.shape
    msg = torch.empty(rows, m // 8 + 4, dtype=torch.uint8, device=x.device)
    for j in range(rows):
        bits, l1 = encode_signs(x[j])
        msg[j, :m // 8] = bits
        msg[j, m // 8:] = as_bytes((l1 / min(m, max(1, valid - j * m))).float().view(1))
    return msg


class SignCompressor(Compressor):
    """Scaled sign with worker + server error feedback (without it: plain scaled sign, biased)."""

    name = "sign"
    error_feedback = True
    cost_model = True

    @classmethod
    def collectives(cls, cfg, plan: GradientPlan, w: int) -> list[tuple[str, float]]:
        """Two phases, as int8's: 1 bit per element plus one float32 scale per shard."""
        return [("all_to_all", plan.n / 8 + 4 * w), ("allgather", plan.n / 8 / w + 4)]

    @classmethod
    def encode_seconds(cls, cfg, n: int) -> float:
        return local_exchange_seconds(cls, cfg, n)     # both phases' passes, error feedback included

    @staticmethod
    def _residual_(x: torch.Tensor, msg: torch.Tensor) -> torch.Tensor:
        """x (rows, shard) -= what each row of msg decodes to, in place: error feedback's x - c in one pass."""
        nb = x.shape[1] // 8
        scale = from_bytes(msg[:, nb:], torch.float32)
        for row, bits, s in zip(x, msg[:, :nb], scale):
            sign_residual(row, bits, s, out=row)
        return x

    def _decode(self, msg: torch.Tensor, shard: int) -> torch.Tensor:
        """(rows, shard/8 + 4) uint8 of sign bits + one float32 scale -> (rows, shard) of +-scale."""
        nb = shard // 8
        scale = from_bytes(msg[:, nb:], torch.float32)                  # (rows, 1)
        if msg.shape[0] == 1:
            return unpack_signs(msg[0, :nb], shard, scale=scale[0]).unsqueeze(0)
        return torch.stack([unpack_signs(row[:nb], shard, scale=s) for row, s in zip(msg, scale)])

    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> torch.Tensor:
        W, r, n, ef = self.transport.world_size, self.transport.rank, grad.numel(), self.cfg.error_feedback
        shard = shard_length(n, W, 8)
        mine_valid = min(shard, max(0, n - r * shard))       # entries of this rank's shard inside the bucket

        x = torch.empty(W * shard, dtype=torch.float32, device=grad.device)
        x[:n] = grad
        x[n:] = 0
        if ef:
            add_bucket_state_(self, views, "/e", x[:n])
        # phase 1: row j = (sign bits, scale) of shard j, for rank j to average
        to_servers = _sign_message(x.view(W, shard), n)
        if ef:     # the residual x - c, c = what the servers decode, in x's own buffer (its padding is not kept)
            put_bucket_state(self, views, "/e", self._residual_(x.view(W, shard), to_servers).view(-1)[:n],
                             copy=False)
        y = mean_rows_(self._decode(self.transport.all_to_all(to_servers), shard))
        y[mine_valid:] = 0
        key = f"server{W}/" + "|".join(v.name for v in views)   # this rank's shard of this bucket layout
        if ef:
            e_s = self.get(key)
            if e_s is not None and e_s.shape == y.shape:
                y += e_s
        from_server = _sign_message(y.view(1, shard), mine_valid)
        if ef:     # e_s = y - c_s on the valid entries, 0 on the padding (a shard of its own: y is a row of W)
            nb = shard // 8
            e_s = sign_residual(y, from_server[0, :nb], from_bytes(from_server[:, nb:], torch.float32)[0])
            e_s[mine_valid:] = 0
            self.put(key, e_s)

        # phase 2: everyone gets every server's (bits, scale), decoded straight into grad (padding never written)
        gathered = self.transport.allgather(from_server[0])
        scales = from_bytes(gathered[:, shard // 8:], torch.float32)
        for j in range(W):
            lo, hi = j * shard, min(n, (j + 1) * shard)
            if hi > lo:
                unpack_signs(gathered[j, :shard // 8], hi - lo, grad.dtype, scales[j], out=grad[lo:hi])
        return grad

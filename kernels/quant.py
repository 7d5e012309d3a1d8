"""Blockwise absmax quantisation (8-bit optimizers / QSGD-style scaling) and int4 nibble packing.

A vector is cut into blocks of `block_size` (the last one may be short); each block keeps one float32
scale s = absmax / L with L = 2^(bits-1) - 1 levels each side, and each element the integer q in [-L, L]
nearest to x / s (or a stochastic rounding of it, which makes q * s an unbiased estimate of x).
The quantiser assumes finite input: a block containing inf/NaN gives undefined q for that block.
"""

from __future__ import annotations

import torch


def _num_blocks(n: int, block_size: int) -> int:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return (n + block_size - 1) // block_size


def quantize_blockwise(x: torch.Tensor, bits: int, block_size: int, stochastic: bool = True,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (n,) -> (q int8 (n,) in [-L, L], scales float32 (ceil(n/block_size),)).

    Stochastic rounding is floor(v + u), u ~ U[0, 1), so q lands on floor(v) or ceil(v) with
    E[q] = v and E[q * s] = x; nearest rounding (stochastic=False) rounds half to even.
    All-zero blocks get s = 0 and q = 0. `generator` must live on x's device.
    """
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    n = x.numel()
    nb = _num_blocks(n, block_size)
    levels = 2 ** (bits - 1) - 1

    xb = torch.zeros(nb * block_size, dtype=torch.float32, device=x.device)
    xb[:n] = x
    xb = xb.view(nb, block_size)                                   # zero padding never raises absmax
    scales = xb.abs().amax(dim=1) / levels
    v = xb.div_(torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1))   # zero blocks: v = 0
    if stochastic:
        v.add_(torch.rand(v.shape, generator=generator, dtype=torch.float32, device=x.device)).floor_()
    else:
        v.round_()
    return v.view(-1)[:n].clamp_(-levels, levels).to(torch.int8), scales


def dequantize_blockwise(q: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """(q int (n,), scales (ceil(n/block_size),)) -> float32 (n,) = q * s of its block."""
    if q.dim() != 1:
        raise ValueError(f"q must be 1-D, got shape {tuple(q.shape)}")
    n = q.numel()
    nb = _num_blocks(n, block_size)
    if scales.shape != (nb,):
        raise ValueError(f"scales has shape {tuple(scales.shape)}, expected ({nb},) for n={n}, "
                         f"block_size={block_size}")
    qb = torch.zeros(nb * block_size, dtype=torch.float32, device=q.device)
    qb[:n] = q
    return qb.view(nb, block_size).mul_(scales.float().unsqueeze(1)).view(-1)[:n]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 (n,) in [-8, 7] -> uint8 (ceil(n/2),): element 2i in the low nibble, 2i+1 in the high one.

    Nibbles are two's complement; odd n pads a 0 nibble. Values outside [-8, 7] are not checked
    (that would sync the device) and wrap modulo 16.
    """
    if q.dim() != 1:
        raise ValueError(f"q must be 1-D, got shape {tuple(q.shape)}")
    if q.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {q.dtype}")
    n = q.numel()
    m = (n + 1) // 2
    nib = torch.zeros(2 * m, dtype=torch.uint8, device=q.device)
    nib[:n] = q.view(torch.uint8) & 0x0F                          # reinterpret: -1 -> 0xFF -> 0xF
    nib = nib.view(m, 2)
    return nib[:, 0] | (nib[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (m,) -> int8 (n,), the inverse of `pack_int4` for n <= 2 m."""
    if packed.dim() != 1:
        raise ValueError(f"packed must be 1-D, got shape {tuple(packed.shape)}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if not 0 <= n <= 2 * packed.numel():
        raise ValueError(f"n={n} must be in [0, {2 * packed.numel()}] for {packed.numel()} packed bytes")
    nib = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:n].to(torch.int8)
    return (nib ^ 8) - 8                                          # sign-extend the 4-bit two's complement

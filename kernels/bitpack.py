"""Bit packing for 1-bit payloads: 8 booleans (or signs) per byte, so a sign vector costs n/8 bytes.

Layout: bit i of the input is bit (i % 8) of byte i // 8, least significant bit first; the unused high
bits of the last byte are 0. This matches numpy.packbits(..., bitorder="little").
"""

from __future__ import annotations

import torch


def _check_1d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def _check_n(n: int, packed: torch.Tensor, per_byte: int) -> None:
    _check_1d("packed", packed)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if not 0 <= n <= per_byte * packed.numel():
        raise ValueError(f"n={n} must be in [0, {per_byte * packed.numel()}] for {packed.numel()} packed bytes")


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool (n,) -> uint8 (ceil(n/8),), LSB first (see module docstring); tail bits are 0."""
    _check_1d("bits", bits)
    if bits.dtype != torch.bool:
        raise ValueError(f"bits must be bool, got {bits.dtype}")
    n = bits.numel()
    nbytes = (n + 7) // 8
    padded = torch.zeros(nbytes * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits
    cols = padded.view(nbytes, 8)
    out = cols[:, 0].clone()
    for j in range(1, 8):          # eight column ORs over n/8 bytes each, not a per-element loop
        out |= cols[:, j] << j
    return out


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (m,) -> bool (n,), the inverse of `pack_bits` for n <= 8 m."""
    _check_n(n, packed, 8)
    return (packed.unsqueeze(1) & _bit_weights(packed.device)).ne(0).reshape(-1)[:n]


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Real (n,) -> uint8 (ceil(n/8),) with bit = (x >= 0); so +0.0 and -0.0 are +, NaN is -."""
    _check_1d("x", x)
    return pack_bits(x >= 0)


def unpack_signs(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 -> (n,) of +1.0 (bit set) / -1.0 (bit clear) in `dtype`."""
    return unpack_bits(packed, n).to(dtype) * 2 - 1

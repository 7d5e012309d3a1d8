"""Bit packing for 1-bit payloads: 8 booleans (or signs) per byte, so a sign vector costs n/8 bytes.

Layout: bit i of the input is bit (i % 8) of byte i // 8, least significant bit first; the unused high
bits of the last byte are 0. This matches numpy.packbits(..., bitorder="little").
"""

from __future__ import annotations

import torch

from kernels import native
from kernels.fused import FusedKernel, compile_body


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


def _pack_signs_reference(x: torch.Tensor) -> torch.Tensor:
    return pack_bits(x >= 0)


def _pack_signs_body(x, out):                    # x (8 m,) -> out uint8 (m,), one column OR per bit
    xb = x.view(out.shape[0], 8) >= 0
    acc = xb[:, 0].to(torch.int32)
    for j in range(1, 8):
        acc = acc | (xb[:, j].to(torch.int32) << j)
    out.copy_(acc.to(torch.uint8))


_BODY: list = []


def _pack_signs_compiled(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    n = x.numel()
    full = n // 8 * 8
    out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    if full and x.dtype == torch.float32 and native.usable(x):
        native.pack_signs(x, full // 8, out)
    elif full:
        if not _BODY:
            _BODY.append(compile_body(_pack_signs_body))
        _BODY[0](x[:full], out[:full // 8])
    if full < n:
        out[full // 8:] = pack_bits(x[full:] >= 0)
    return out


_PACK_SIGNS = FusedKernel("pack_signs", _pack_signs_compiled, _pack_signs_reference,
                          lambda d: (torch.randn(77, generator=torch.Generator().manual_seed(0)).to(d),))


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Real (n,) -> uint8 (ceil(n/8),) with bit = (x >= 0); so +0.0 and -0.0 are +, NaN is -."""
    _check_1d("x", x)
    return _PACK_SIGNS(x)


def _encode_signs_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    lanes = torch.zeros(-(-n // 16), 16, dtype=torch.float64, device=x.device)
    lanes.view(-1)[:n] = x.abs()
    l1 = lanes.cumsum(0)[-1].cumsum(0)[-1] if n else lanes.new_zeros(())     # CPU cumsum adds in index order
    return _pack_signs_reference(x), l1


def _encode_signs_fast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype != torch.float32 or not native.usable(x):
        return _encode_signs_reference(x)
    n = x.numel()
    out = torch.empty((n + 7) // 8, dtype=torch.uint8)
    l1 = torch.empty((), dtype=torch.float64)
    native.encode_signs(x, out, l1)
    if n % 8:
        out[n // 8:] = pack_bits(x[n // 8 * 8:] >= 0)
    return out, l1


_ENCODE_SIGNS = FusedKernel("encode_signs", _encode_signs_fast, _encode_signs_reference,
                            lambda d: (torch.randn(77, generator=torch.Generator().manual_seed(0)).to(d) * 3,))


def encode_signs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real (n,) -> (`pack_signs(x)`, sum |x| as a float64 0-d tensor): a scaled-sign codec's whole encode.

    The sum has a fixed order, so every path gives the same bits: lane l = i mod 16 adds |x_i| (exact in float64)
    in ascending i, then the 16 lanes are added in order (on CPU, float32, one pass of kernels.native's C with the
    packing; the reference builds the lanes with cumsum, which on CPU adds in index order). Its rounding error is
    ~n/16 ulps of float64, far below the float32 a scale is sent in.
    """
    _check_1d("x", x)
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    return _ENCODE_SIGNS(x.contiguous())


_TABLES: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _sign_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row b is byte b's eight bits as +1 (set) / -1 (clear), LSB first."""
    key = (str(device), dtype)
    if key not in _TABLES:
        b = torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)
        _TABLES[key] = ((b & 1) * 2 - 1).to(dtype)
    return _TABLES[key]


def _unpack_signs_reference(packed: torch.Tensor, n: int, dtype: torch.dtype, scale: torch.Tensor | None,
                            out: torch.Tensor | None = None):
    table = _sign_table(packed.device, dtype)
    if scale is not None:
        table = table * scale.to(dtype).reshape(())
    signs = torch.index_select(table, 0, packed.int()).view(-1)[:n]
    return signs if out is None else out.copy_(signs)


def _unpack_signs_fast(packed: torch.Tensor, n: int, dtype: torch.dtype, scale: torch.Tensor | None,
                       out: torch.Tensor | None = None):
    if dtype != torch.float32 or not native.usable(packed) or (out is not None and not native.usable(out)):
        return _unpack_signs_reference(packed, n, dtype, scale, out)   # no compiled body: the lookup is one gather
    whole = n // 8 if out is not None else packed.numel()
    if out is None:
        out = torch.empty(8 * whole, dtype=dtype)
    native.unpack_signs(packed, whole, 1.0 if scale is None else scale.to(dtype).item(), out)
    if 8 * whole < n:
        _unpack_signs_reference(packed[whole:], n - 8 * whole, dtype, scale, out[8 * whole:])
    return out[:n]


_UNPACK_SIGNS = FusedKernel("unpack_signs", _unpack_signs_fast, _unpack_signs_reference,
                            lambda d: (torch.arange(256, dtype=torch.uint8, device=d), 2041, torch.float32,
                                       torch.tensor([-0.75], device=d)))


def unpack_signs(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32,
                 scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 -> (n,) of +1 (bit set) / -1 (bit clear) in `dtype`, times `scale` (a one-element tensor) if given,
    written into `out` ((n,) of `dtype`) if given.

    The reference looks each byte up in the (256, 8) table of +-1 (times scale): one gather of 8 values per byte;
    on CPU, float32, the C of `kernels.native` writes the same values (a masked blend of +-scale).
    """
    _check_n(n, packed, 8)
    if out is not None and (out.shape != (n,) or out.dtype != dtype):
        raise ValueError(f"out is {out.dtype} of shape {tuple(out.shape)}, expected {dtype} of shape ({n},)")
    return _UNPACK_SIGNS(packed.contiguous(), n, dtype, scale, out)


def _sign_residual_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.sub(x, _unpack_signs_reference(packed, x.numel(), x.dtype, scale), out=out)


def _sign_residual_fast(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    if x.dtype != torch.float32 or not native.usable(x, packed) or (out is not None and not native.usable(out)):
        return _sign_residual_reference(x, packed, scale, out)
    n = x.numel()
    out = torch.empty_like(x) if out is None else out
    native.sign_residual(x, packed, n // 8, scale.float().item(), out)
    if n % 8:
        _sign_residual_reference(x[n // 8 * 8:], packed[n // 8:], scale, out[n // 8 * 8:])
    return out


_SIGN_RESIDUAL = FusedKernel("sign_residual", _sign_residual_fast, _sign_residual_reference,
                             lambda d: (torch.randn(77, generator=torch.Generator().manual_seed(0)).to(d),
                                        torch.arange(10, dtype=torch.uint8, device=d) * 25,
                                        torch.tensor([0.75], device=d)))


def sign_residual(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x - unpack_signs(packed, n, scale=scale), error feedback's residual of a scaled-sign message, in one pass
    (into `out`, which may be x itself)."""
    _check_1d("x", x)
    _check_n(x.numel(), packed, 8)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"out is {out.dtype} of shape {tuple(out.shape)}, expected {x.dtype} of shape "
                         f"{tuple(x.shape)}")
    return _SIGN_RESIDUAL(x.contiguous(), packed.contiguous(), scale, out)

"""Blockwise absmax quantisation (8-bit optimizers / QSGD-style scaling) and int4 nibble packing.

A vector is cut into blocks of `block_size` (the last one may be short); each block keeps one float32
scale s = absmax / L with L = 2^(bits-1) - 1 levels each side, and each element the integer

    q = clamp(round(x * inv), -L, L)        nearest (half to even), or
    q = clamp(floor(x * inv + u_i), -L, L)  stochastic, u_i = kernels.rng.uniform(i, key), E[q] = x * inv

with inv = L * (1 / absmax) computed once per block in float32 (inv = 0 where it is not finite: all-zero
blocks, and blocks with absmax below ~L 2^-128), so q * s is an unbiased estimate of x up to float32
rounding and the 2^-24 grid of u. i is the element's index in the vector; the key is drawn once per call
from the caller's generator. The quantiser assumes finite input: a block containing inf/NaN gives undefined
q for that block.

4-bit codes from `encode_blockwise` put a block's two halves side by side: byte j of a block holds element j
(low nibble) and element j + block_size/2 (high nibble), so packing and unpacking read and write contiguous
runs; `pack_int4` keeps the plain layout (element 2i low, 2i+1 high) for callers that pack whole vectors.

Each codec has a torch reference (`_*_reference`, the source of truth) and a compiled path (`_*_compiled`) for
the whole blocks, the reference formula on the short tail: on CPU the hand-written C of `kernels.native` (one
read of each block), elsewhere or without a C compiler a torch.compile'd body. `kernels.fused.FusedKernel`
dispatches and checks that the compiled path gives the reference's bytes.
"""

from __future__ import annotations

import torch

from kernels import native
from kernels.fused import FusedKernel, compile_body
from kernels.rng import random_key, uniform


def _num_blocks(n: int, block_size: int) -> int:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return (n + block_size - 1) // block_size


_CONSTANTS: dict[tuple[int, str], torch.Tensor] = {}      # small per-device argument tensors, made once


def _levels(bits: int, device: torch.device) -> torch.Tensor:
    """L = 2^(bits-1) - 1 as a 0-d float32 tensor: the same argument for the reference and the compiled body."""
    key = (-bits, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(float(2 ** (bits - 1) - 1), device=device)
    return _CONSTANTS[key]


def _cols(block: int, device: torch.device) -> torch.Tensor:
    """arange(block) int32 on `device`: the fused bodies build element indices from it (an in-kernel arange
    costs more than the hash) and take the block size from its shape."""
    key = (block, str(device))
    if key not in _CONSTANTS:
        cols = torch.arange(block, dtype=torch.int32, device=device)
        torch._dynamo.mark_static(cols, 0)        # the block size is compiled in as a constant; n stays dynamic
        _CONSTANTS[key] = cols
    return _CONSTANTS[key]


# ---- references ----------------------------------------------------------------------------------------------
def _quantize_rows(xb: torch.Tensor, levels: torch.Tensor, key: torch.Tensor | None,
                   index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (rows, block) -> (q int8 (rows, block), scales (rows,)): the module docstring's formula."""
    absmax = xb.abs().amax(1, keepdim=True)
    inv = absmax.reciprocal() * levels              # written as inductor computes it, so both give the same bits
    v = xb * torch.where(inv < float("inf"), inv, 0.0)
    v = v.round() if key is None else (v + uniform(index, key)).floor()
    return torch.minimum(torch.maximum(v, -levels), levels).to(torch.int8), absmax.view(-1) / levels


def _quantize_reference(x: torch.Tensor, levels: torch.Tensor, block: int, key: torch.Tensor | None,
                        cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    nb = _num_blocks(n, block)
    xb = torch.zeros(nb * block, dtype=torch.float32, device=x.device)
    xb[:n] = x                                                      # zero padding never raises absmax
    index = torch.arange(nb * block, dtype=torch.int32, device=x.device).view(nb, block)
    q, scales = _quantize_rows(xb.view(nb, block), levels, key, index)
    return q.view(-1)[:n], scales


def _dequantize_reference(q: torch.Tensor, scales: torch.Tensor, block: int, cols: torch.Tensor,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    n, nb = q.numel(), scales.numel()
    qb = torch.zeros(nb * block, dtype=torch.float32, device=q.device)
    qb[:n] = q
    decoded = qb.view(nb, block).mul_(scales.float().unsqueeze(1)).view(-1)[:n]
    return decoded if out is None else out.copy_(decoded)


def _pack_int4_reference(q: torch.Tensor) -> torch.Tensor:
    n = q.numel()
    m = (n + 1) // 2
    nib = torch.zeros(2 * m, dtype=torch.uint8, device=q.device)
    nib[:n] = q.view(torch.uint8) & 0x0F                          # reinterpret: -1 -> 0xFF -> 0xF
    nib = nib.view(m, 2)
    return nib[:, 0] | (nib[:, 1] << 4)


def _unpack_int4_reference(packed: torch.Tensor, n: int) -> torch.Tensor:
    nib = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:n].to(torch.int8)
    return (nib ^ 8) - 8                                          # sign-extend the 4-bit two's complement


def _pack_halves(q: torch.Tensor) -> torch.Tensor:
    """int (rows, 2h) -> uint8 (rows, h): column j in the low nibble, column j + h in the high one (two contiguous
    reads, which vectorise; adjacent pairs need a strided gather)."""
    q = q.to(torch.int32)
    h = q.shape[1] // 2
    return ((q[:, :h] & 15) | ((q[:, h:] & 15) << 4)).to(torch.uint8)


def _unpack_halves(b: torch.Tensor) -> torch.Tensor:
    """uint8 (rows, h) -> int32 (rows, 2, h): the sign-extended low nibbles, then the high ones."""
    shifts = torch.tensor([0, 4], dtype=torch.int32, device=b.device).view(1, 2, 1)
    return (((b.to(torch.int32).unsqueeze(1) >> shifts) & 15) ^ 8) - 8


def _pack_blocks(q: torch.Tensor, block: int) -> torch.Tensor:
    """int8 (n,) -> uint8 (ceil(n/2),), block even: per block, element j beside element j + block/2 (the short
    last block of t elements: j beside j + ceil(t/2), a 0 nibble when t is odd)."""
    n = q.numel()
    full = n // block * block
    head = _pack_halves(q[:full].view(-1, block)).view(-1)
    if full == n:
        return head
    tail = torch.zeros(2 * ((n - full + 1) // 2), dtype=q.dtype, device=q.device)
    tail[:n - full] = q[full:]
    return torch.cat([head, _pack_halves(tail.view(1, -1)).view(-1)])


def _unpack_blocks(codes: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """The inverse of `_pack_blocks`: -> int8 (n,)."""
    full = n // block * block
    q = _unpack_halves(codes[:full // 2].view(-1, block // 2)).reshape(-1)
    if full < n:
        q = torch.cat([q, _unpack_halves(codes[full // 2:].view(1, -1)).reshape(-1)[:n - full]])
    return q.to(torch.int8)


def _encode4_reference(x, levels, block, key, cols):
    q, scales = _quantize_reference(x, levels, block, key, cols)
    return _pack_blocks(q, block), scales


def _decode4_reference(codes, scales, n, block, cols, out=None):
    return _dequantize_reference(_unpack_blocks(codes, n, block), scales, block, cols, out)


# ---- compiled path: full blocks by a compiled body writing into one output buffer, the short tail by the
# reference formula ------------------------------------------------------------------------------------------
def _quantize_body(x, levels, key, cols, q_out, s_out):              # x, q_out (rows * block,), s_out (rows,)
    block = cols.shape[0]
    rows = s_out.shape[0]
    index = cols + torch.arange(rows, dtype=torch.int32, device=x.device).view(-1, 1) * block
    q, s = _quantize_rows(x.view(rows, block), levels, key, index)
    q_out.view(rows, block).copy_(q)
    s_out.copy_(s)


def _dequantize_body(q, scales, cols, out):                          # q, out (rows * block,), scales (rows,)
    block = cols.shape[0]
    rows = scales.shape[0]
    out.view(rows, block).copy_(q.view(rows, block).float() * scales.float().unsqueeze(1))


def _encode4_body(x, levels, key, cols, codes_out, s_out):           # block even; codes_out (rows * block / 2,)
    block = cols.shape[0]
    rows = s_out.shape[0]
    index = cols + torch.arange(rows, dtype=torch.int32, device=x.device).view(-1, 1) * block
    q, s = _quantize_rows(x.view(rows, block), levels, key, index)
    codes_out.view(rows, block // 2).copy_(_pack_halves(q))
    s_out.copy_(s)


def _decode4_body(codes, scales, cols, out):                         # block even
    block = cols.shape[0]
    rows = scales.shape[0]
    q = _unpack_halves(codes.view(rows, block // 2))
    out.view(rows, 2, block // 2).copy_(q.float() * scales.float().view(rows, 1, 1))


_BODIES: dict[str, object] = {}


def _body(fn):
    if fn.__name__ not in _BODIES:
        _BODIES[fn.__name__] = compile_body(fn)
    return _BODIES[fn.__name__]


def _quantize_compiled(x, levels, block, key, cols):
    n = x.numel()
    nf = n // block
    full = nf * block
    x = x.float().contiguous()
    q = torch.empty(n, dtype=torch.int8, device=x.device)
    s = torch.empty(_num_blocks(n, block), dtype=torch.float32, device=x.device)
    if native.usable(x):
        native.quantize8(x, n, block, levels.item(), key, q, s)
        return q, s
    if nf:
        _body(_quantize_body)(x[:full], levels, key, cols, q[:full], s[:nf])
    if full < n:
        qt, s[nf:] = _quantize_rows(x[full:].view(1, -1), levels, key, cols[:n - full] + full)
        q[full:] = qt.view(-1)
    return q, s


def _dequantize_compiled(q, scales, block, cols, out=None):               # out: contiguous float32 (n,), or None
    q, scales = q.contiguous(), scales.float().contiguous()
    n = q.numel()
    nf = n // block
    full = nf * block
    out = torch.empty(n, dtype=torch.float32, device=q.device) if out is None else out
    if q.dtype == torch.int8 and native.usable(q):
        native.dequantize8(q, scales, n, block, out)
        return out
    if nf:
        _body(_dequantize_body)(q[:full], scales[:nf], cols, out[:full])
    if full < n:
        out[full:] = q[full:].float() * scales[nf].float()
    return out


def _encode4_compiled(x, levels, block, key, cols):                  # block even
    n = x.numel()
    nf = n // block
    full = nf * block
    x = x.float().contiguous()
    codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    s = torch.empty(_num_blocks(n, block), dtype=torch.float32, device=x.device)
    if native.usable(x):
        native.encode4(x, n, block, levels.item(), key, codes, s)
        return codes, s
    if nf:
        _body(_encode4_body)(x[:full], levels, key, cols, codes[:full // 2], s[:nf])
    if full < n:
        qt, s[nf:] = _quantize_rows(x[full:].view(1, -1), levels, key, cols[:n - full] + full)
        codes[full // 2:] = _pack_blocks(qt.view(-1), block)
    return codes, s


def _decode4_compiled(codes, scales, n, block, cols, out=None):     # block even; out as _dequantize_compiled's
    codes, scales = codes.contiguous(), scales.float().contiguous()
    nf = n // block
    full = nf * block
    out = torch.empty(n, dtype=torch.float32, device=codes.device) if out is None else out
    if native.usable(codes):
        native.decode4(codes, scales, n, block, out)
        return out
    if nf:
        _body(_decode4_body)(codes[:full // 2], scales[:nf], cols, out[:full])
    if full < n:
        out[full:] = _unpack_blocks(codes[full // 2:], n - full, block).float() * scales[nf].float()
    return out


def _codes_and_decoded(x, levels, bits, block, key, cols, quantize, dequantize, encode4, decode4):
    """(codes, scales, decode(codes, scales)) by one path's four functions."""
    if bits == 8:
        q, s = quantize(x, levels, block, key, cols)
        return q.view(torch.uint8), s, dequantize(q, s, block, cols)
    codes, s = encode4(x, levels, block, key, cols)
    return codes, s, decode4(codes, s, x.numel(), block, cols)


def _encode_residual_reference(x, levels, bits, block, key, cols):
    codes, s, decoded = _codes_and_decoded(x, levels, bits, block, key, cols, _quantize_reference,
                                           _dequantize_reference, _encode4_reference, _decode4_reference)
    return codes, s, x.float() - decoded


def _encode_residual_compiled(x, levels, bits, block, key, cols):
    x = x.float().contiguous()
    n = x.numel()
    if not native.usable(x):                     # the compiled encode and decode, then the difference
        codes, s, decoded = _codes_and_decoded(x, levels, bits, block, key, cols, _quantize_compiled,
                                               _dequantize_compiled, _encode4_compiled, _decode4_compiled)
        return codes, s, torch.sub(x, decoded, out=decoded)
    res = torch.empty(n, dtype=torch.float32)
    s = torch.empty(_num_blocks(n, block), dtype=torch.float32)
    if bits == 8:
        q = torch.empty(n, dtype=torch.int8)
        native.quantize8(x, n, block, levels.item(), key, q, s, res)
        return q.view(torch.uint8), s, res
    codes = torch.empty((n + 1) // 2, dtype=torch.uint8)
    native.encode4(x, n, block, levels.item(), key, codes, s, res)
    return codes, s, res


def _example_x(device, n: int = 16 * 7 + 5) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)


def _example_key(device) -> torch.Tensor:
    return torch.tensor([123456789, -987654321], dtype=torch.int32, device=device)


def _example_codes(device, n: int, bits: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, ((n * bits + 7) // 8,), generator=g, dtype=torch.uint8).to(device)


_QUANTIZE = FusedKernel("quantize_blockwise", _quantize_compiled, _quantize_reference,
                        lambda d: (_example_x(d), _levels(8, d), 16, _example_key(d), _cols(16, d)))
_DEQUANTIZE = FusedKernel("dequantize_blockwise", _dequantize_compiled, _dequantize_reference,
                          lambda d: (_example_codes(d, 117, 8).view(torch.int8), _example_x(d, 8).abs(), 16, _cols(16, d)))
_ENCODE4 = FusedKernel("encode_int4", _encode4_compiled, _encode4_reference,
                       lambda d: (_example_x(d), _levels(4, d), 16, _example_key(d), _cols(16, d)))
_ENCODE_RESIDUAL = FusedKernel("encode_with_residual", _encode_residual_compiled, _encode_residual_reference,
                                lambda d: (_example_x(d), _levels(4, d), 4, 16, _example_key(d), _cols(16, d)))
_DECODE4 = FusedKernel("decode_int4", _decode4_compiled, _decode4_reference,
                       lambda d: (_example_codes(d, 117, 4), _example_x(d, 8).abs(), 117, 16, _cols(16, d)))


# ---- public API ----------------------------------------------------------------------------------------------
def _check_quantize_args(x: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    _num_blocks(x.numel(), block_size)
    return _levels(bits, x.device)


def quantize_blockwise(x: torch.Tensor, bits: int, block_size: int, stochastic: bool = True,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (n,) -> (q int8 (n,) in [-L, L], scales float32 (ceil(n/block_size),)); see the module docstring.

    Stochastic rounding lands on floor(v) or ceil(v), v = x * inv, with E[q] = v; nearest rounding
    (stochastic=False) rounds half to even. All-zero blocks get s = 0 and q = 0. `generator` (on x's device)
    supplies the hash key, two int32 draws per call.
    """
    levels = _check_quantize_args(x, bits, block_size)
    key = random_key(generator, x.device) if stochastic else None
    return _QUANTIZE(x, levels, block_size, key, _cols(block_size, x.device))


def _check_scales(n: int, scales: torch.Tensor, block_size: int) -> None:
    nb = _num_blocks(n, block_size)
    if scales.shape != (nb,):
        raise ValueError(f"scales has shape {tuple(scales.shape)}, expected ({nb},) for n={n}, "
                         f"block_size={block_size}")


def _check_out(out: torch.Tensor | None, n: int, device: torch.device) -> None:
    if out is not None and (out.shape != (n,) or out.dtype != torch.float32 or not out.is_contiguous()
                            or out.device != device):
        raise ValueError(f"out must be a contiguous float32 ({n},) tensor on {device}, got {out.dtype} of shape "
                         f"{tuple(out.shape)} on {out.device}")


def dequantize_blockwise(q: torch.Tensor, scales: torch.Tensor, block_size: int,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """(q int (n,), scales (ceil(n/block_size),)) -> float32 (n,) = q * s of its block (written into `out`, a
    contiguous float32 (n,), if given)."""
    if q.dim() != 1:
        raise ValueError(f"q must be 1-D, got shape {tuple(q.shape)}")
    _check_scales(q.numel(), scales, block_size)
    _check_out(out, q.numel(), q.device)
    return _DEQUANTIZE(q, scales, block_size, _cols(block_size, q.device), out)


def _check_byte_encoding(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 for a byte encoding, got {bits}")
    if bits == 4 and block_size % 2:
        raise ValueError(f"block_size must be even for 4-bit codes (two halves of a block share its bytes), "
                         f"got {block_size}")


def encode_blockwise(x: torch.Tensor, bits: int, block_size: int, stochastic: bool = True,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (n,) -> (codes uint8 (n bits / 8,), scales): `quantize_blockwise`'s q; bits = 8 codes are q's bytes,
    bits = 4 codes pack each block's halves (`_pack_blocks`: byte j of a block holds element j in its low nibble and
    element j + block_size/2 in its high one; block_size must be even). One fused pass on the compiled path."""
    _check_byte_encoding(bits, block_size)
    if bits == 8:
        q, scales = quantize_blockwise(x, 8, block_size, stochastic, generator)
        return q.view(torch.uint8), scales
    levels = _check_quantize_args(x, bits, block_size)
    key = random_key(generator, x.device) if stochastic else None
    args = (x, levels, block_size, key, _cols(block_size, x.device))
    return _ENCODE4(*args)


def encode_with_residual(x: torch.Tensor, bits: int, block_size: int, stochastic: bool = True,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`encode_blockwise`'s (codes, scales) and error feedback's residual x - decode_blockwise(codes, scales) (float32
    (n,)), the same bytes as calling the three; on CPU one pass of kernels.native's C writes all three."""
    _check_byte_encoding(bits, block_size)
    levels = _check_quantize_args(x, bits, block_size)
    key = random_key(generator, x.device) if stochastic else None
    return _ENCODE_RESIDUAL(x, levels, bits, block_size, key, _cols(block_size, x.device))


def decode_blockwise(codes: torch.Tensor, scales: torch.Tensor, n: int, bits: int, block_size: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `encode_blockwise` up to quantisation: (codes, scales) -> float32 (n,), into `out` (a contiguous
    float32 (n,)) if given."""
    _check_byte_encoding(bits, block_size)
    if codes.dim() != 1 or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be 1-D uint8, got {codes.dtype} of shape {tuple(codes.shape)}")
    if codes.numel() != (n * bits + 7) // 8:
        raise ValueError(f"codes has {codes.numel()} bytes, expected {(n * bits + 7) // 8} for n={n}, bits={bits}")
    if bits == 8:
        return dequantize_blockwise(codes.view(torch.int8), scales, block_size, out)
    _check_scales(n, scales, block_size)
    _check_out(out, n, codes.device)
    return _DECODE4(codes, scales, n, block_size, _cols(block_size, codes.device), out)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 (n,) in [-8, 7] -> uint8 (ceil(n/2),): element 2i in the low nibble, 2i+1 in the high one.

    Nibbles are two's complement; odd n pads a 0 nibble. Values outside [-8, 7] are not checked
    (that would sync the device) and wrap modulo 16.
    """
    if q.dim() != 1:
        raise ValueError(f"q must be 1-D, got shape {tuple(q.shape)}")
    if q.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {q.dtype}")
    return _pack_int4_reference(q)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (m,) -> int8 (n,), the inverse of `pack_int4` for n <= 2 m."""
    if packed.dim() != 1:
        raise ValueError(f"packed must be 1-D, got shape {tuple(packed.shape)}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if not 0 <= n <= 2 * packed.numel():
        raise ValueError(f"n={n} must be in [0, {2 * packed.numel()}] for {packed.numel()} packed bytes")
    return _unpack_int4_reference(packed, n)

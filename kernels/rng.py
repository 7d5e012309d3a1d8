"""Counter-based random numbers: a hash of (key, index), so any element's bits cost O(1) and need no state.

    t = ((i + k0) * C1) ^ k1;   h = (t ^ (t >>> 16)) * C2           (mod 2^32, as int32 two's complement)
    u = (h >>> 8) * 2^-24                                            uniform on the 2^24-point grid of [0, 1)

C1 = 0x9E3779B1 (golden ratio), C2 = 0x85EBCA6B (MurmurHash3's fmix32); `>>>` is the logical shift (an
arithmetic shift masked). One multiply-xorshift-multiply round keyed twice, so different keys are not shifts of
one stream. Only high bits are used: a product's bit j depends on input bits <= j only, so h's low bits are
weak (for instance bit 0 of h(i) ^ h(i') does not depend on k1), while the top bits depend on all of them.
For every index, h is a bijection of k1, so u is exactly uniform on its grid over random keys. The same int32
torch ops give the same bits on CPU, CUDA and in compiled code. The key (k0, k1) is drawn once per call from the
caller's torch.Generator, so the generator alone still determines everything.
"""

from __future__ import annotations

import torch

C1 = 0x9E3779B1 - (1 << 32)      # as int32
C2 = 0x85EBCA6B - (1 << 32)


def random_key(generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """(k0, k1) int32 (2,) on `device`, drawn from `generator` (which must live on that device)."""
    return torch.randint(-2**31, 2**31, (2,), generator=generator, dtype=torch.int32, device=device)


def hash32(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """int32 index (any shape) -> int32 h(key, index), the module docstring's h (wraps mod 2^32)."""
    t = ((index + key[0]) * C1) ^ key[1]
    return (t ^ ((t >> 16) & 0xFFFF)) * C2


def uniform(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """float32 u = (h >>> 8) 2^-24 in [0, 1), exact in float32."""
    return ((hash32(index, key) >> 8) & 0xFFFFFF).float() * 2.0**-24


def uniform_int(index: torch.Tensor, key: torch.Tensor, high: torch.Tensor | int) -> torch.Tensor:
    """int64 floor(u53 high) in [0, high), high < 2^31: u53 = (h(2i) >>> 5, h(2i+1) >>> 6) as a 53-bit fraction
    (high bits only), so P of each value is within high / 2^53 of 1/high."""
    i = index.to(torch.int32) * 2
    a = (hash32(i, key) >> 5) & 0x7FFFFFF                                # top 27 bits
    b = (hash32(i + 1, key) >> 6) & 0x3FFFFFF                            # top 26 bits
    u = (a.double() * 2.0**26 + b.double()) * 2.0**-53
    return torch.minimum((u * high).long(), torch.as_tensor(high, device=index.device) - 1)

"""Sparsification: pick k of n entries (top-k by magnitude, or uniformly at random) and scatter back.

Indices are int32 (half the bytes of int64 on the wire) and sorted ascending, so payloads are
deterministic and compress well; n must therefore be below 2^31.
"""

from __future__ import annotations

import functools
import math

import torch

from kernels import fused, native
from kernels.fused import FusedKernel, compile_body
from kernels.rng import random_key, uniform_int

_INT32_MAX = 2**31 - 1


def _check(x: torch.Tensor, k: int) -> int:
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D, got shape {tuple(x.shape)}")
    n = x.numel()
    if n > _INT32_MAX:
        raise ValueError(f"x has {n} elements, more than int32 indices can address")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be in [0, {n}]")
    return n


def topk_select(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest-|x| entries, ties at the k-th largest |x| broken towards lower indices: (values (k,) in x's
    dtype, indices int32 (k,) ascending).

    Exact, but cheaper than a full torch.topk on large n: a threshold t from a strided sample of |x|
    keeps the candidates |x| >= t; when at least k survive, every top-k entry is among them (the k-th
    largest is >= t), so the k largest of the candidates are the answer. Otherwise, all of x is searched.
    Magnitudes are compared as |x|'s bit patterns (integers), so NaN ranks above inf, as torch.topk ranks it, and
    every comparison is exact. On CPU, float32, kernels.native's C does it in one pass over x (the sample's order
    statistic by radix select, the candidates compress-stored, the k-th largest by radix select, then one walk
    that applies the tie rule).
    """
    n = _check(x, k)
    if k == 0:
        return x[:0], torch.zeros(0, dtype=torch.int32, device=x.device)
    return _TOPK(x.contiguous(), k)


_SAMPLES = 1 << 14           # every 9th cache line of the benchmark FNO's 9.5 MB gradient


@functools.lru_cache(maxsize=64)
def _prime_at_most(m: int) -> int:
    """The largest prime <= m (m >= 2)."""
    while any(m % d == 0 for d in range(2, math.isqrt(m) + 1)):
        m -= 1
    return m


def _sample_plan(n: int, k: int) -> tuple[int, int] | None:
    """(stride, r): the threshold is the r-th smallest |x| of the _SAMPLES-element sample x[::stride], the (1 - k/n)
    quantile lowered by 4 binomial standard deviations (and 8), so that fewer than k candidates is a > 4-sigma event
    for a sample that is representative; None where n is too small to sample. The stride is prime: a stride that
    divides a weight's row length (the FNO's 24 x 12 x 2 spectral rows and n // 2^14 = 144) samples the same few
    columns of every row, and its threshold kept 4k candidates instead of ~1.2k."""
    if 4 * _SAMPLES >= n:
        return None
    p = k / n
    r = int(_SAMPLES * (1 - p) - 4 * (_SAMPLES * p * (1 - p)) ** 0.5) - 8
    return (_prime_at_most(n // _SAMPLES), r) if r >= 1 else None


_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as its bit patterns: non-negative integers in |x|'s order, NaN above inf."""
    if x.dtype not in _INT_OF:
        raise ValueError(f"topk_select wants a float tensor, got {x.dtype}")
    return x.abs().view(_INT_OF[x.dtype])


def _k_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k largest of a (m,) integers, k <= m, ties at the k-th largest to the lowest indices."""
    v = torch.topk(a, k, sorted=False).values.min()
    above, tie = a > v, a == v
    return above | (tie & (tie.cumsum(0) <= k - above.sum()))


def _topk_reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    bits = _magnitude_bits(x)
    plan = _sample_plan(x.numel(), k)
    if plan is not None:
        stride, r = plan
        sample = bits[::stride][:_SAMPLES]
        threshold = torch.topk(sample, _SAMPLES - r + 1, sorted=False).values.min()    # the r-th smallest
        cand = torch.nonzero(bits >= threshold).squeeze(1)                              # ascending
        if cand.numel() >= k:
            idx = cand[_k_largest(bits[cand], k)]
            return x[idx], idx.to(torch.int32)
    idx = torch.nonzero(_k_largest(bits, k)).squeeze(1)
    return x[idx], idx.to(torch.int32)


def _topk_fast(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype != torch.float32 or not native.usable(x):
        return _topk_reference(x, k)
    plan = _sample_plan(x.numel(), k)
    if plan is not None:
        threshold = native.sample_rank(x, plan[0], _SAMPLES, plan[1] - 1)
        found = native.topk(x, threshold, k, 4 * k + 4096)           # the expected count is ~k
        if found is not None:
            return found
    return native.topk(x, 0, k, x.numel())   # every entry a candidate: one more pass, still no sort


_TOPK = FusedKernel("topk_select", _topk_fast, _topk_reference,        # rounded: ties at the k-th largest
                    lambda d: (torch.randn(1000, generator=torch.Generator().manual_seed(0)).round(decimals=1).to(d),
                               37))


def randk_select(x: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct indices, ascending, each included with probability exactly k/n: (x[indices] unscaled, int32).

    Stratified sampling on the circle [0, n), rotated: arc j = [floor(j n / k), floor((j+1) n / k)) of size
    s_j in {floor(n/k), ceil(n/k)}; a rotation c ~ U{0..n-1} and one offset o_j ~ U{0..s_j-1} per arc give
    index_j = (floor(j n / k) + o_j + c) mod n. For each c, index i is picked with probability 1/s of its arc;
    averaged over c that is (1/n) sum_j s_j / s_j = k/n. So (n/k) * scatter_dense(n, *randk_select(x, k)) is
    unbiased with E||.||^2 = (n/k) ||x||^2, as for a uniform k-subset (the marginals are all that needs); unlike
    one, two indices of one arc are never picked together. The draws are `kernels.rng` hashes of j keyed by
    two int32 from `generator` (which must live on x's device): O(k) work, no randperm.
    """
    n = _check(x, k)
    if k == 0:
        return x[:0], torch.zeros(0, dtype=torch.int32, device=x.device)
    key = random_key(generator, x.device)
    j = torch.arange(k + 1, dtype=torch.int64, device=x.device)
    idx = _RANDK(j, torch.tensor(n, device=x.device), key)
    return x.index_select(0, idx), idx.to(torch.int32)


def _randk_indices(j: torch.Tensor, n: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """j = arange(k + 1) int64, n a 0-d int64 tensor -> the k ascending int64 indices of `randk_select`."""
    k = j.shape[0] - 1
    bounds = j * n // k                                                   # (k + 1,) arc boundaries
    start, size = bounds[:-1], bounds[1:] - bounds[:-1]
    c = uniform_int(j[k:].to(torch.int32), key, n)                        # hash index k: the rotation
    idx = start + uniform_int(j[:k].to(torch.int32), key, size) + c
    wrapped = idx >= n                                                     # a suffix of the ascending idx
    idx = torch.where(wrapped, idx - n, idx)
    return idx.index_select(0, (j[:k] - wrapped.sum()) % k)               # rotate that suffix to the front


def _randk_indices_compiled(j, n, key):
    if not _BODY:
        _BODY.append(compile_body(_randk_indices))
    return _BODY[0](j, n, key)


_BODY: list = []
_RANDK = FusedKernel("randk_indices", _randk_indices_compiled, _randk_indices,
                     lambda d: (torch.arange(8, device=d), torch.tensor(23, device=d),
                                torch.tensor([3, -4], dtype=torch.int32, device=d)), min_numel=1 << 12)


def scatter_dense(n: int, indices: torch.Tensor, values: torch.Tensor, out: torch.Tensor | None = None,
                  accumulate: bool = True) -> torch.Tensor:
    """Scatter `values` at `indices` into a dense (n,) tensor (`out`, or new zeros of values' dtype).

    accumulate=True adds (index_add_: duplicate indices sum, e.g. an allgather of every rank's top-k);
    accumulate=False writes (with duplicates, which one wins is unspecified). indices/values may be
    (m,) or (world, k); they are flattened. Indices must be in [0, n): checked on the CPU (C) path, elsewhere
    as index_add_ does (a CUDA check would sync).
    """
    if indices.shape != values.shape:
        raise ValueError(f"indices shape {tuple(indices.shape)} != values shape {tuple(values.shape)}")
    if out is None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out = torch.zeros(n, dtype=values.dtype, device=values.device)
    elif out.shape != (n,):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected ({n},)")
    idx = indices.reshape(-1)
    vals = values.reshape(-1).to(out.dtype)
    if accumulate and _native_scatter(out, idx, vals):
        native.scatter_add(out, idx.contiguous(), vals.contiguous())     # index_add_'s sums, in its order
    elif accumulate:
        out.index_add_(0, idx.long(), vals)
    else:
        out[idx.long()] = vals
    return out


def _native_scatter(out: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> bool:
    """Whether scatter_dense's accumulate takes the C loop. Not a FusedKernel: it works in place on `out`, which the
    first-use check (fast and reference on the same arguments) cannot compare; tests compare it with index_add_."""
    return (fused.mode() != "reference" and out.dtype == vals.dtype == torch.float32 and idx.dtype == torch.int32
            and out.is_contiguous() and native.usable(out, vals))

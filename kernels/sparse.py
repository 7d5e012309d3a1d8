"""Sparsification: pick k of n entries (top-k by magnitude, or uniformly at random) and scatter back.

Indices are int32 (half the bytes of int64 on the wire) and sorted ascending, so payloads are
deterministic and compress well; n must therefore be below 2^31.
"""

from __future__ import annotations

import torch

from kernels import native
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
    """The k largest-|x| entries: (values (k,) in x's dtype, indices int32 (k,) ascending).

    Exact, but cheaper than a full torch.topk on large n: a threshold t from a strided sample of |x|
    keeps the candidates |x| >= t; when at least k survive, every top-k entry is among them (the k-th
    largest is >= t), so topk over the candidates is the exact answer. Otherwise, a full topk.
    Ties at the threshold are broken by torch.topk on |x|; the candidates, and so the indices, are ascending.
    """
    n = _check(x, k)
    idx = None
    samples = 1 << 16
    if 0 < k and 4 * samples < n:
        sample = x[:: n // samples][:samples].abs()
        p = k / n
        # rank of the threshold in the sample: the (1-p) quantile, lowered by 4 binomial std devs
        rank = int(samples * (1 - p) - 4 * (samples * p * (1 - p)) ** 0.5) - 8
        if rank >= 1:
            # the rank-th smallest = the smallest of the (samples - rank + 1) largest: a short topk, not a selection
            threshold = torch.topk(sample, samples - rank + 1, sorted=False).values.min()
            cand = _candidates(x, threshold, k)                               # ascending
            if cand.numel() >= k:
                keep = torch.zeros(cand.numel(), dtype=torch.bool, device=x.device)
                keep[torch.topk(x[cand].abs(), k, sorted=False).indices] = True
                idx = cand[keep]                                              # still ascending: no sort
    if idx is None:
        idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
    return x[idx], idx.to(torch.int32)


def _candidates_reference(x: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nonzero(x.abs() >= threshold).squeeze(1)


def _candidates_fast(x: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype == torch.float32 and native.usable(x):
        found = native.select_abs_ge(x, threshold.item(), 4 * k + 4096)
        if found is not None:
            return found
    return _candidates_reference(x, threshold, k)


# Ascending int64 indices of |x| >= threshold: on CPU float32 one pass of kernels.native's C (room for 4k + 4096 of
# them; the threshold's expected count is ~k), else torch.nonzero of the mask (a mask pass, then a compaction).
_candidates = FusedKernel("topk_candidates", _candidates_fast, _candidates_reference,
                          lambda d: (torch.randn(100, generator=torch.Generator().manual_seed(0)).to(d),
                                     torch.tensor(1.0, device=d), 3))


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
    (m,) or (world, k); they are flattened. Indices must be in [0, n): not checked (it would sync).
    """
    if indices.shape != values.shape:
        raise ValueError(f"indices shape {tuple(indices.shape)} != values shape {tuple(values.shape)}")
    if out is None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out = torch.zeros(n, dtype=values.dtype, device=values.device)
    elif out.shape != (n,):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected ({n},)")
    idx = indices.reshape(-1).long()
    vals = values.reshape(-1).to(out.dtype)
    if accumulate:
        out.index_add_(0, idx, vals)
    else:
        out[idx] = vals
    return out

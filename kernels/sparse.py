"""Sparsification: pick k of n entries (top-k by magnitude, or uniformly at random) and scatter back.

Indices are int32 (half the bytes of int64 on the wire) and sorted ascending, so payloads are
deterministic and compress well; n must therefore be below 2^31.
"""

from __future__ import annotations

import torch

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
    Ties at the threshold are broken by torch.topk on |x|, then the indices are sorted.
    """
    n = _check(x, k)
    mag = x.abs()
    idx = None
    samples = 1 << 16
    if 0 < k and 4 * samples < n:
        sample = mag[:: n // samples][:samples]
        p = k / n
        # rank of the threshold in the sample: the (1-p) quantile, lowered by 4 binomial std devs
        rank = int(samples * (1 - p) - 4 * (samples * p * (1 - p)) ** 0.5) - 8
        if rank >= 1:
            cand = torch.nonzero(mag >= sample.kthvalue(rank).values).squeeze(1)
            if cand.numel() >= k:
                idx = cand[torch.topk(mag[cand], k, sorted=False).indices]
    if idx is None:
        idx = torch.topk(mag, k, sorted=False).indices
    idx = idx.sort().values
    return x[idx], idx.to(torch.int32)


def randk_select(x: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct indices uniform without replacement, ascending: (x[indices] unscaled, indices int32).

    Each index is kept with probability k/n, so (n/k) * scatter_dense(n, *randk_select(x, k)) is unbiased.
    `generator` must live on x's device.
    """
    n = _check(x, k)
    idx = torch.randperm(n, generator=generator, device=x.device)[:k].sort().values
    return x[idx], idx.to(torch.int32)


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

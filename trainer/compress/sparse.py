"""Top-k and random-k sparsification with EF21 error feedback, exchanged by allgather.

EF21 (Richtárik, Sokolov, Fatkhullin 2021, "EF21: A New, Simpler, Theoretically Better, and
Practically Faster Error Feedback"), per bucket with k = ceil(density * n):

    worker i:   c_i = C(grad_i - g_i);   g_i += c_i                 (local state, per parameter)
    all ranks:  allgather the k (value, int32 index) pairs of every c_j
                g += mean_j c_j;  return g                          (replicated state, per parameter)

so g = mean_i g_i holds after every step, and with a contractive C each g_i tracks grad_i. Top-k is
contractive with delta = k/d: ||C(x) - x||^2 <= (1 - k/d) ||x||^2. Rand-k unscaled is contractive
with the same delta in expectation; scaled by d/k it is instead unbiased with variance omega = d/k - 1
(the unbiased-vs-contractive distinction of MASHA, Beznosikov et al. 2022), which needs no error
feedback: `randk_unbiased = true` averages (d/k) RandK(grad_i). With `error_feedback = false` top-k
(and rand-k) average the plain C(grad_i).
"""

from __future__ import annotations

import math

import torch

from kernels import randk_select, scatter_dense, topk_select
from trainer.compress.base import (Compressor, GradientPlan, ParamView, bucket_state, call_generator, from_bytes,
                                   local_exchange_seconds, put_bucket_state)


class TopKCompressor(Compressor):
    """EF21 with top-k (or plain averaged top-k without error feedback)."""

    name = "topk"
    error_feedback = True
    cost_model = True

    @classmethod
    def collectives(cls, cfg, plan: GradientPlan, w: int) -> list[tuple[str, float]]:
        """An allgather of k float32 values + int32 indices per rank."""
        return [("allgather", 8 * math.ceil(cfg.options(cls.name).density * plan.n))]

    @classmethod
    def encode_seconds(cls, cfg, n: int) -> float:
        """Selection, EF21's estimate updates and the scatter: the whole exchange on a world of one."""
        return local_exchange_seconds(cls, cfg, n)

    @property
    def ef21(self) -> bool:
        return self.cfg.error_feedback

    def _select(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_select(x, k)

    def _mean_sparse(self, n: int, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """mean_j of every rank's sparse (values, indices), dense (n,), through one allgather."""
        k = values.numel()
        payload = torch.cat([values.float().view(torch.int32), indices])           # (2k,) int32
        got = self.transport.allgather(payload)                                       # (W, 2k)
        vals, idx = from_bytes(got[:, :k], torch.float32), got[:, k:]
        out = torch.zeros(n, dtype=torch.float32, device=values.device)
        # One rank at a time: indices are distinct within a row, so no two adds race (index_add_ on CUDA
        # uses atomics) and the sum order is fixed -> bit-identical on every rank, and g never drifts.
        for j in range(got.shape[0]):
            scatter_dense(n, idx[j], vals[j], out=out)
        return out.div_(got.shape[0])

    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> torch.Tensor:
        n = grad.numel()
        k = min(max(math.ceil(self.cfg.options(self.name).density * n), 1), n)
        if not self.ef21:
            values, indices = self._select(grad, k)
            if self.name == "randk" and self.cfg.randk.unbiased:
                values = values * (n / k)
            return grad.copy_(self._mean_sparse(n, values, indices))

        g_i = bucket_state(self, views, "/g_i", grad)
        g = bucket_state(self, views, "/g", grad, local=False)
        values, indices = self._select(grad - g_i, k)
        scatter_dense(n, indices, values, out=g_i)                                    # g_i += c_i
        g += self._mean_sparse(n, values, indices)                                    # g += mean_j c_j
        put_bucket_state(self, views, "/g_i", g_i, copy=False)                       # both built here, not reused
        put_bucket_state(self, views, "/g", g, local=False, copy=False)
        return grad.copy_(g)

    def load_state_dict(self, state: dict, same_world: bool) -> str | None:
        """With a different world size g = mean_i g_i no longer holds: reset g_i and g together."""
        super().load_state_dict(state, same_world)
        if same_world:
            return None
        had = any(key.endswith("/g") for key in self.replicated)
        self.replicated = {key: v for key, v in self.replicated.items() if not key.endswith("/g")}
        return "EF21 estimates g_i and g reset (world size changed)" if had else None


class RandKCompressor(TopKCompressor):
    """EF21 with (unscaled, contractive) random-k; or, with `randk_unbiased`, the averaged unbiased
    (d/k) RandK(grad) without error feedback. Indices come from a per-(seed, rank, call) generator."""

    name = "randk"

    @property
    def ef21(self) -> bool:
        return self.cfg.error_feedback and not self.cfg.randk.unbiased

    def _select(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return randk_select(x, k, call_generator(self, x.device))

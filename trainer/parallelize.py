"""Apply data parallelism to a model built without knowing about it (torchtitan's `parallelize` step)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.comm import GradientExchange, TorchHookExchange, register_gradient_exchange, register_torch_hook
from trainer.config import CommConfig


def parallelize(model: torch.nn.Module, comm: CommConfig, device: torch.device,
                example_loss: Callable[[torch.nn.Module], torch.Tensor], seed: int = 0) -> tuple[torch.nn.Module, GradientExchange | TorchHookExchange | None]:
    """Wrap `model` in DDP with our gradient exchange (or one of torch's hooks) as its communication hook.

    With one rank there is nothing to exchange: the model comes back unwrapped and the exchange is None.
    """
    model.to(device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model, None
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=comm.bucket_cap_mb)
    if comm.compressor.startswith("torch_"):
        return ddp, register_torch_hook(ddp, comm.compressor, comm)
    exchange = register_gradient_exchange(ddp, comm, seed)
    _settle_buckets(ddp, exchange, example_loss)
    return ddp, exchange


def _settle_buckets(ddp: DDP, exchange: GradientExchange, example_loss: Callable[[torch.nn.Module], torch.Tensor]
                    ) -> None:
    """DDP's first backward runs with one bucket and then re-buckets by gradient-ready order. Compressors that
    work per bucket (quantisation shards, top-k, server-side residuals) must see the same layout at every step
    whether a run started at step 0 or resumed at step k, so one throw-away backward (plain allreduce, grads
    discarded, no optimizer step, no compressor state touched) settles the layout before training starts."""
    exchange.bypass = True
    example_loss(ddp).backward()
    exchange.bypass = False
    ddp.module.zero_grad(set_to_none=True)

"""Apply data parallelism to a model built without knowing about it (torchtitan's `parallelize` step)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.comm import GradientExchange, register_gradient_exchange
from trainer.config import CommConfig


def parallelize(model: torch.nn.Module, comm: CommConfig, device: torch.device
                ) -> tuple[torch.nn.Module, GradientExchange | None]:
    """Wrap `model` in DDP with our gradient exchange as its communication hook.

    With one rank there is nothing to exchange: the model comes back unwrapped and the exchange is None.
    """
    model.to(device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model, None
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              bucket_cap_mb=comm.bucket_cap_mb)
    return ddp, register_gradient_exchange(ddp, comm.compressor)

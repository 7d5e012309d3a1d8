"""Uncompressed exchanges: fp32 allreduce (the baseline), fp16 allreduce, and `skip` (no exchange)."""

from __future__ import annotations

import torch

from trainer.compress.base import Compressor, ParamView


class AllReduceCompressor(Compressor):
    """fp32 allreduce, then divide by the world size: exactly DDP's default."""
    name = "none"

    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> tuple[torch.Tensor, int]:
        self.transport.allreduce_(grad).div_(self.transport.world_size)
        return grad, grad.numel() * grad.element_size()


class FP16Compressor(Compressor):
    """Cast to fp16 (after dividing by the world size, so the sum cannot overflow), allreduce, cast back.
    No error feedback, like torch's fp16_compress_hook."""
    name = "fp16"

    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> tuple[torch.Tensor, int]:
        half = grad.div(self.transport.world_size).to(torch.float16)
        self.transport.allreduce_(half)
        return grad.copy_(half), half.numel() * half.element_size()


class SkipCompressor(Compressor):
    """No exchange at all: each rank keeps its own gradient. Only for measuring the compute-only floor
    (replicas drift apart; the run's summary reports by how much)."""
    name = "skip"

    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> tuple[torch.Tensor, int]:
        return grad, 0

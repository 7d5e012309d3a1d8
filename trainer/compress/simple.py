"""Uncompressed exchanges: fp32 allreduce (the baseline), fp16/bf16 allreduce, and `skip` (no exchange)."""

from __future__ import annotations

import torch

from trainer.compress.base import Compressor, GradientPlan, ParamView, timed


class AllReduceCompressor(Compressor):
    """fp32 allreduce, then divide by the world size: exactly DDP's default."""
    name = "none"
    cost_model = True

    @classmethod
    def collectives(cls, cfg, plan: GradientPlan, w: int) -> list[tuple[str, float]]:
        return [("allreduce", 4 * plan.n)]

    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> torch.Tensor:
        return self.transport.allreduce_(grad).div_(self.transport.world_size)


class FP16Compressor(Compressor):
    """Cast to fp16 (after dividing by the world size, so the sum cannot overflow), allreduce, cast back.
    No error feedback, like torch's fp16_compress_hook."""
    name, dtype = "fp16", torch.float16
    cost_model = True

    @classmethod
    def collectives(cls, cfg, plan: GradientPlan, w: int) -> list[tuple[str, float]]:
        return [("allreduce", 2 * plan.n)]

    @classmethod
    def encode_seconds(cls, cfg, n: int) -> float:
        x = torch.randn(n)
        return timed(lambda: x.to(cls.dtype).float())

    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> torch.Tensor:
        half = grad.div(self.transport.world_size).to(self.dtype)
        self.transport.allreduce_(half)
        return grad.copy_(half)


class BF16Compressor(FP16Compressor):
    """As fp16, in bfloat16: fp32's exponent range (no overflow or underflow worries), 8 significant bits
    (relative error up to 2^-8 per cast instead of 2^-11)."""
    name, dtype = "bf16", torch.bfloat16


class SkipCompressor(Compressor):
    """No exchange at all: each rank keeps its own gradient. Only for measuring the compute-only floor
    (replicas drift apart; the run's summary reports by how much)."""
    name = "skip"

    def exchange(self, grad: torch.Tensor, views: list[ParamView]) -> torch.Tensor:
        return grad

"""Losses and test errors shared by operator-learning models."""

from __future__ import annotations

import torch
from torch import nn

from trainer.registry import Batch, DataSpec


def relative_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ||pred - target||_2 / ||target||_2, shape (batch,) (the FNO paper's metric and loss)."""
    diff = (pred - target).flatten(1).norm(dim=1)
    return diff / target.flatten(1).norm(dim=1).clamp_min(1e-12)


def operator_errors(model: nn.Module, batch: Batch, data: DataSpec) -> torch.Tensor:
    """Per-sample relative L2 in physical units: prediction and target decoded with the store's statistics."""
    return relative_l2(data.target_norm.decode(model(batch["x"])), data.target_norm.decode(batch["y"]))


def operator_loss(model: nn.Module, batch: Batch, data: DataSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """Relative L2 in physical units, averaged over the batch."""
    loss = operator_errors(model, batch, data).mean()
    return loss, {"rel_l2": loss.item()}


def operator_example_batch(data: DataSpec, rows: int = 1) -> Batch:
    return {"x": torch.zeros(rows, *data.input_shape), "y": torch.zeros(rows, *data.target_shape)}

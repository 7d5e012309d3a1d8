"""User targets named by import path in tests (model.density_sampler.target = "tests.user_targets:...")."""

import torch


def nan_density(x: torch.Tensor) -> torch.Tensor:
    """NaN everywhere: refused before training starts."""
    return torch.full(x.shape[:1], float("nan"), dtype=x.dtype)


def wrong_shape(x: torch.Tensor) -> torch.Tensor:
    return x.sum(1, keepdim=True)

"""The optimizer a run trains with: the configured one over the model's learning-rate groups, and how its learning
rate follows the global batch."""

from __future__ import annotations

import math
import re

import torch


def batch_lr_scale(optimizer: str, global_batch: int, reference_batch: int) -> float:
    """Learning-rate factor when the global batch changes from `reference_batch` to `global_batch`.

    SGD: linear, lr ~ B (Goyal et al. 2017, "Accurate, Large Minibatch SGD"). Adam/AdamW: square root,
    lr ~ sqrt(B) (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms";
    Granziol et al. 2022, "Learning Rates as a Function of Batch Size").
    """
    ratio = global_batch / reference_batch
    return ratio if optimizer == "sgd" else math.sqrt(ratio)


def lr_groups(model: torch.nn.Module, params, optimizer: str, lr: float) -> list:
    """`params` (what an engine hands the optimizer) as parameter groups at lr x each parameter's factor.

    A module may define `lr_multipliers(optimizer_name) -> {parameter name: factor}` over its own parameters (the FNO
    does under muP); they are found over `model.named_modules()` and matched by name, so they reach a backbone inside
    another model, FSDP2's DTensors (registered in place under the same names) and DeepSpeed's real storage of complex
    weights (torch's `parametrizations.<name>.original`). Without a factor other than 1 the parameters come back as
    one list, today's optimizer exactly. Otherwise one group per factor, the group at 1 first (metrics.csv logs group
    0's lr), each keeping its "lr_multiplier" for a resume (`Trainer._apply_config_on_resume`)."""
    params = list(params)
    factors: dict[str, float] = {}
    for prefix, module in model.named_modules():
        if callable(getattr(module, "lr_multipliers", None)):
            factors.update({f"{prefix}.{n}" if prefix else n: f for n, f in module.lr_multipliers(optimizer).items()})
    if all(f == 1.0 for f in factors.values()):
        return params
    names = {id(p): re.sub(r"parametrizations\.(\w+)\.original$", r"\1", n) for n, p in model.named_parameters()}
    assert {names.get(id(p)) for p in params} >= factors.keys(), "the optimizer was given parameters the model lacks"
    groups: dict[float, list] = {1.0: []}
    for p in params:
        groups.setdefault(factors.get(names[id(p)], 1.0), []).append(p)
    return [{"params": ps, "lr": lr * f, "lr_multiplier": f} for f, ps in groups.items() if ps]


def build_optimizer(o, model: torch.nn.Module, params) -> torch.optim.Optimizer:
    """The optimizer of config section `o` ([optim]) over `params` (an engine's own, possibly sharded, parameters of
    `model`), in the model's learning-rate groups."""
    params = lr_groups(model, params, o.name, o.lr)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, foreach=False)

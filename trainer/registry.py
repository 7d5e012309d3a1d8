"""The model registry: what the trainer needs to know about a model, so that `Trainer` imports none.

    register_model(ModelSpec(name="fno", config=FNOConfig, build=..., loss=..., evaluate=..., example_batch=..., shard_units=...))
    spec = get_model_spec(cfg.model.name)

A model file defines its module and registers one `ModelSpec`; `trainer/models/__init__.py` imports the built-in
ones. Batches are dicts of tensors on the device (the field loaders give {"x": inputs, "y": targets}, normalised
with the store's statistics); `DataSpec` carries what a loss needs from the dataset (shapes, the target normaliser).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DataSpec:
    input_shape: tuple[int, ...]     # (C_in, *grid) of one sample
    target_shape: tuple[int, ...]    # (C_out, *grid)
    target_norm: nn.Module           # ChannelNormalizer: decode() maps normalised targets to physical units


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: type                                                  # dataclass of its table, [model.<name>]
    check: Callable[[Any, DataSpec], None]                       # (model config, data) -> None or ValueError
    build: Callable[[Any, DataSpec], nn.Module]                  # (model config, data) -> module
    loss: Callable[[nn.Module, Batch, DataSpec], tuple[torch.Tensor, dict[str, float]]]   # mean loss, metrics
    evaluate: Callable[[nn.Module, Batch, DataSpec], torch.Tensor]    # per-sample test error, shape (batch,)
    example_batch: Callable[..., Batch]     # (data, rows=default) -> a batch of `rows` samples (default: one small
                                            # batch, for shape checks and warm-up; rows: the training size, timed)
    shard_units: Callable[[nn.Module], list[nn.Module]]         # submodules a sharded engine wraps one by one
    # optional: this operator as a diffusion backbone, (model config, in_channels, out_channels, emb_dim) -> module
    # whose forward(x, emb) takes a noise embedding (B, emb_dim) that modulates each layer
    backbone: Callable[[Any, int, int, int], nn.Module] | None = None
    trainer: str | None = None             # "module:Class", a Trainer subclass this model trains with (lazy import)
    # "module:Class" of the model's own data source (None: a Zarr store, [data] path): Class(cfg, rank, world_size)
    # validates (ValueError), then gives data_spec(device), identity(), loader() and, for preflight, is built once
    source: str | None = None

    def trainer_class(self) -> type | None:
        return _import(self.trainer)

    def source_class(self) -> type | None:
        return _import(self.source)


def _import(path: str | None):
    if path is None:
        return None
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    assert spec.name not in MODELS, f"model {spec.name!r} registered twice"
    MODELS[spec.name] = spec
    return spec


def get_model_spec(name: str) -> ModelSpec:
    import trainer.models  # noqa: F401 (registers the built-in models)
    if name not in MODELS:
        raise ValueError(f"config key 'model.name' = {name!r}; allowed: {', '.join(map(repr, MODELS))}")
    return MODELS[name]

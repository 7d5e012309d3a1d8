"""The model registry: a model is one ModelSpec; the Trainer trains any registered one without knowing it."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from conftest import REPO, SMALL_MODEL
from trainer.models.losses import operator_errors, operator_example_batch, operator_loss
from trainer.registry import MODELS, ModelSpec, get_model_spec, register_model

CONFIG = str(REPO / "configs" / "darcy_fno.toml")


@dataclass
class PointwiseConfig:
    """[model.test_pointwise]: no settings."""


def _pointwise(cfg, data) -> nn.Module:
    return nn.Conv2d(data.input_shape[0], data.target_shape[0], 1)


@pytest.fixture
def pointwise_model():
    spec = register_model(ModelSpec(name="test_pointwise", config=PointwiseConfig, check=lambda cfg, data: None, build=_pointwise,
                                    loss=operator_loss, evaluate=operator_errors,
                                    example_batch=operator_example_batch, shard_units=lambda m: [m]))
    yield spec
    del MODELS[spec.name]


def test_a_registered_model_trains_through_the_unchanged_trainer(small_darcy, tmp_path, pointwise_model):
    from trainer.config import load_config
    from trainer.train import Trainer
    cfg = load_config(CONFIG, [f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "model.name='test_pointwise'",
                               "train.max_steps=12", *SMALL_MODEL])
    trainer = Trainer(cfg)
    assert isinstance(trainer.model, nn.Conv2d)
    before = trainer.evaluate()
    summary = trainer.train()
    assert summary["steps"] == 12 and summary["test_rel_l2"] < before   # lr 1e-2 Adam on a linear map: it learns


def test_unknown_model_names_the_key_and_the_registered_ones():
    with pytest.raises(ValueError, match=r"'model\.name' = 'unet'; allowed: 'fno'"):
        get_model_spec("unet")


def test_fno_spec_checks_modes_against_the_grid_and_lists_its_shard_units():
    from data.loader import ChannelNormalizer
    from trainer.models.fno import FNOConfig
    from trainer.registry import DataSpec
    spec = get_model_spec("fno")
    data = DataSpec((1, 17, 17), (1, 17, 17), ChannelNormalizer([1.0], [2.0]))
    with pytest.raises(ValueError, match=r"'model\.fno\.modes' = \[4\] has 1 entries"):
        spec.check(FNOConfig(modes=[4]), data)
    model = spec.build(FNOConfig(width=8, modes=[4, 4], n_layers=3, projection_channels=8), data)
    units = spec.shard_units(model)
    assert len(units) == 5 and units[0] is model.lifting and units[-1] is model.projection
    # every parameter is in exactly one unit, so a sharded engine wrapping the units covers the model
    owned = [id(p) for u in units for p in u.parameters()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    batch = spec.example_batch(data)
    loss, metrics = spec.loss(model, batch, data)
    assert loss.shape == () and torch.isfinite(loss) and metrics["rel_l2"] == loss.item()


def test_example_batches_at_the_training_size():
    """The DDP bucket cap times a backward of the spec's example batch built at the training size: it has that many
    samples (a simulated batch says so in its counts), and a mean loss over identical samples equals the default
    example's (to float32 rounding of a mean)."""
    from data.loader import ChannelNormalizer
    from trainer.models.fno import FNOConfig
    from trainer.registry import DataSpec
    from trainer.train import batch_rows
    data = DataSpec((1, 17, 17), (1, 17, 17), ChannelNormalizer([1.0], [2.0]))
    fno = get_model_spec("fno")
    one, big = fno.example_batch(data), fno.example_batch(data, 5)
    assert batch_rows(one) == 1 and batch_rows(big) == 5 and big["x"].shape[1:] == one["x"].shape[1:]
    torch.manual_seed(0)
    model = fno.build(FNOConfig(width=8, modes=[4, 4], n_layers=2, projection_channels=8), data)
    assert fno.loss(model, big, data)[0].item() == pytest.approx(fno.loss(model, one, data)[0].item(), rel=1e-6)
    import trainer.density.model  # noqa: F401  (registers density_sampler)
    sim = get_model_spec("density_sampler").example_batch(data, 300)
    assert batch_rows(sim) == 300 and int(sim["global_n"]) == 300 and int(sim["seed"]) == 0

import pytest

from trainer.config import load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optim]\nlr = 1e-2\n[model]\nmodes = [8, 8]\n')
    cfg = load_config(path, ["optim.lr=3e-4", "data.path=runs/x.zarr", "model.width=16", "train.epochs=3"])
    assert cfg.optim.lr == 3e-4
    assert cfg.data.path == "runs/x.zarr"
    assert cfg.model.modes == [8, 8] and cfg.model.width == 16 and cfg.train.epochs == 3
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0   # an int widens to float


@pytest.mark.parametrize("override, named", [
    ("optim.lrr=1e-3", "optim.lrr"),
    ("optimizer.lr=1e-3", "optimizer"),
    ("optim.name=lamb", "optim.name"),
    ("comm.compressor=zip", "comm.compressor"),
    ("model.width=wide", "model.width"),
    ("model.modes=[0, 4]", "model.modes"),
    ("data.test_fraction=1.5", "data.test_fraction"),
    ("train.epochs=0", "train.epochs"),
])
def test_bad_keys_and_values_name_the_key(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_lists_the_allowed_ones(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert "optim.learning_rate" in str(e.value) and "lr" in str(e.value)


def test_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\n")
    with pytest.raises(ValueError, match="bad.toml"):
        load_config(bad)

import pytest

from conftest import REPO
from trainer.config import load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optim]\nlr = 1e-2\n[model.fno]\nmodes = [8, 8]\n')
    cfg = load_config(path, ["optim.lr=3e-4", "data.path=runs/x.zarr", "model.fno.width=16", "train.epochs=3"])
    assert cfg.optim.lr == 3e-4
    assert cfg.data.path == "runs/x.zarr"
    assert cfg.model.fno.modes == [8, 8] and cfg.model.fno.width == 16 and cfg.train.epochs == 3
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0   # an int widens to float


@pytest.mark.parametrize("override, named", [
    ("optim.lrr=1e-3", "optim.lrr"),
    ("optimizer.lr=1e-3", "optimizer"),
    ("optim.name=lamb", "optim.name"),
    ("comm.compressor=zip", "comm.compressor"),
    ("model.fno.width=wide", "model.fno.width"),
    ("model.fno.modes=[0, 4]", "model.fno.modes"),
    ("data.test_fraction=1.5", "data.test_fraction"),
    ("train.epochs=0", "train.epochs"),
    ("comm.int4.block_size=255", "comm.int4.block_size"),
    ("optim.gamma=1.5", "optim.gamma"),
    ("optim.step_size=0", "optim.step_size"),
])
def test_bad_keys_and_values_name_the_key(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_nested_tables_and_overrides_at_any_depth(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[parallel]\nengine = "ddp"\n[comm]\ncompressor = "powersgd"\n[comm.powersgd]\nrank = 2\n')
    cfg = load_config(path, ["comm.powersgd.rank=3", "parallel.bucket_cap_mb=4", "comm.topk.density=0.5"])
    assert (cfg.comm.powersgd.rank, cfg.parallel.bucket_cap_mb, cfg.comm.topk.density) == (3, 4.0, 0.5)
    d = cfg.to_dict()
    assert d["comm"]["powersgd"]["rank"] == 3 and d["model"] == {"name": "fno", "fno": d["model"]["fno"]}
    assert load_config(None, [f"{k}={v!r}".replace("'", '"') for k, v in [("model.fno.width", 8)]]).model.fno.width == 8


@pytest.mark.parametrize("override, says", [
    ("model.width=16", "'model.width' moved to 'model.fno.width'"),
    ("comm.rank=2", "'comm.rank' moved to 'comm.powersgd.rank'"),
    ("comm.bucket_cap_mb=4", "'comm.bucket_cap_mb' moved to 'parallel.bucket_cap_mb'"),
    ("comm.powersgd.rnak=2", "unknown config key 'comm.powersgd.rnak'; allowed: complex, compute, min_compression_rate, p_wire, q_wire, rank, view"),
    ("comm.powersgd=2", "config section 'comm.powersgd' must be a table"),
    ("comm.powersgd.view=rows", "'comm.powersgd.view' = 'rows'; allowed: 'first', 'balanced'"),
    ("comm.powersgd.p_wire=fp8", "'comm.powersgd.p_wire' = 'fp8'; allowed: 'float32', 'bfloat16'"),
    ("comm.powersgd.compute=float16", "'comm.powersgd.compute' = 'float16'; allowed: 'float32', 'bfloat16'"),
    ("model.fno.modes=[0, 4]", "'model.fno.modes'"),
    ("model.name=unet", "'model.name' = 'unet'; allowed: 'fno'"),
    ("model.unet.width=3", "'model.name' = 'unet'; allowed: 'fno'"),
    ("parallel.engine=megatron", "'parallel.engine' = 'megatron'; allowed: 'ddp', 'fsdp2', 'deepspeed'"),
    ("parallel.zero_stage=4", "'parallel.zero_stage' = 4; allowed: 1, 2, 3"),
    ("parallel.param_dtype=fp8", "'parallel.param_dtype' = 'fp8'; allowed: 'float32', 'bfloat16', 'float16'"),
    ("optim.lr.x=1", "'optim.lr' is a value, not a table"),
])
def test_nested_keys_are_named_with_what_is_allowed(override, says):
    overrides = ["optim.lr=1", override] if override.startswith("optim.lr.") else [override]
    with pytest.raises(ValueError) as e:
        load_config(None, overrides)
    assert says in str(e.value)


def test_old_checkpoint_configs_compare_in_the_new_layout():
    """A checkpoint written with the flat layout resumes under the nested one: same values, no change reported."""
    from trainer.config import resume_changes
    new = load_config(None, ["comm.compressor=topk", "comm.topk.density=0.1"]).to_dict()
    old = {**new, "model": {"name": "fno", **new["model"]["fno"]},
           "comm": {k: v for k, v in new["comm"].items() if not isinstance(v, dict)}}
    old["comm"].update(rank=4, powersgd_complex="complex", min_compression_rate=2.0, density=0.1,
                       randk_unbiased=False, block_size=256, bucket_cap_mb=25.0)
    del old["parallel"]
    changes = resume_changes(old, new)
    # The flat density served topk and randk alike; randk's table differs now but is not this run's compressor.
    assert changes == {"refuse": [], "reset": [], "batch": [], "allow": [("comm.randk.density", 0.1, 0.01)]}
    old["model"]["width"] = 64
    assert [k for k, *_ in resume_changes(old, new)["refuse"]] == ["model.fno.width"]


def test_checkpoints_from_before_fast_padding_keep_exact_padding():
    """Before model.fno.fast_padding, padding was exact: resuming such a run under the new default is refused by
    name, and resumes cleanly with the old behaviour asked for."""
    from trainer.config import resume_changes
    new = load_config(None, []).to_dict()
    old = {**new, "model": {"name": "fno", "fno": {k: v for k, v in new["model"]["fno"].items()
                                                   if k != "fast_padding"}}}
    assert [k for k, *_ in resume_changes(old, new)["refuse"]] == ["model.fno.fast_padding"]
    exact = load_config(None, ["model.fno.fast_padding=false"]).to_dict()
    assert resume_changes(old, exact)["refuse"] == []


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


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """`make demo` and the README's commands start from these files: each must pass today's validation."""
    load_config(path)

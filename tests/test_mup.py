"""The FNO's maximal-update parametrization (model.fno.parametrization = "mup", trainer/models/fno.py), the trainer's
learning-rate groups (trainer/optim.py: lr_groups) and the LR-transfer figure of a study (launch/study_proxy.py).

The measured check is the property muP exists for (Yang & Hu 2021; Yang et al. 2022, "Tensor Programs V"): the first
Adam step moves the hidden features and the output by an amount that does not depend on the width. Adam's first step
moves every entry by about lr (m_hat / sqrt(v_hat) = sign(g)), and a hidden weight's update is correlated with its
input, so it moves each coordinate of the next layer by ~ lr x fan_in: slope +1 in log(change) against log(width)
under the standard parametrization, 0 under muP (hidden and output LR x base/width). Bounds: |slope| <= 0.25 for
muP and >= 0.75 for standard, a quarter of the way from each theoretical value to the other. Measured over three
disjoint sets of 4 seeds (widths 16-128, lr 1e-2): standard 0.91-0.96 (hidden) and 0.94-1.05 (output); muP -0.03 to
+0.01 (hidden) and -0.12 to -0.02 (output). The check has teeth for the LR rules: leaving the hidden weights' LR
unscaled under muP measured +0.96 (hidden), the output weight's +0.37 (output). It does not see the init rules or the
input layer's LR (their part of the first step is small at these widths); test_mup_follows_table_3_at_twice_the_base
checks those exactly.
"""

import json
import math

import pytest
import torch

from conftest import REPO, SMALL_MODEL

CONFIG = str(REPO / "configs" / "darcy_fno.toml")


def _fno(width: int, parametrization: str = "standard", base_width: int | None = None, seed: int = 0, **kw):
    from trainer.models.fno import FNO
    torch.manual_seed(seed)
    return FNO(1, 1, (4, 4), width=width, n_layers=2, projection_channels=32, parametrization=parametrization,
               base_width=base_width, **kw)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.detach()) if t.is_complex() else t.detach()


# ---- config and the standard default ---------------------------------------------------------------------------
def test_standard_is_the_default_and_builds_the_same_model_and_optimizer():
    from trainer.config import load_config
    from trainer.models.fno import FNO, _build
    from trainer.registry import DataSpec
    from trainer.optim import lr_groups
    data = DataSpec((1, 17, 17), (1, 17, 17), torch.nn.Identity())
    default = load_config(CONFIG, []).model.fno
    assert default.parametrization == "standard" and default.base_width == default.width == 32
    explicit = load_config(CONFIG, ['model.fno.parametrization="standard"', "model.fno.base_width=8"]).model.fno
    mup_at_base = load_config(CONFIG, ['model.fno.parametrization="mup"', "model.fno.base_width=32"]).model.fno
    models = []
    for cfg in (default, explicit, mup_at_base):
        torch.manual_seed(0)
        models.append(_build(cfg, data))
    torch.manual_seed(0)
    models.append(FNO(1, 1, (12, 12), width=32, n_layers=4, padding=8, projection_channels=128))  # no new arguments
    reference = list(models[-1].parameters())
    for m in models[:-1]:
        assert all(torch.equal(a, b) for a, b in zip(reference, m.parameters()))
        params = list(m.parameters())
        assert lr_groups(m, params, "adam", 1e-3) == params   # one plain list, as before: no groups, no new keys


def test_invalid_values_name_the_key():
    from trainer.config import load_config
    with pytest.raises(ValueError, match=r"'model.fno.parametrization' = 'muP'; allowed: 'standard', 'mup'"):
        load_config(CONFIG, ['model.fno.parametrization="muP"'])
    with pytest.raises(ValueError, match=r"'model.fno.base_width' = -1"):
        load_config(CONFIG, ["model.fno.base_width=-1"])
    with pytest.raises(ValueError, match=r"'model.fno.base_width' = 'wide' is a str"):
        load_config(CONFIG, ['model.fno.base_width="wide"'])


# ---- the rules -------------------------------------------------------------------------------------------------
# Tensor Programs V, Table 3, at width = 2 x base_width (m = 2): the learning-rate factor of each class.
TABLE_3 = {"adam": {"input": 1.0, "hidden": 0.5, "output": 0.5, "finite": 1.0},
           "adamw": {"input": 1.0, "hidden": 0.5, "output": 0.5, "finite": 1.0},
           "sgd": {"input": 2.0, "hidden": 1.0, "output": 0.5, "finite": 1.0}}
CLASSES = {"lifting.0.weight": "finite", "lifting.0.bias": "finite",            # 3 -> lifting_channels (fixed)
           "lifting.2.weight": "input", "lifting.2.bias": "input",              # lifting_channels -> width
           "blocks.0.spectral.weight": "hidden", "blocks.0.skip.weight": "hidden", "blocks.0.skip.bias": "input",
           "blocks.0.film.weight": "input", "blocks.0.film.bias": "input",      # emb_dim -> 2 width
           "projection.0.weight": "output", "projection.0.bias": "finite",      # width -> projection_channels
           "projection.2.weight": "finite", "projection.2.bias": "finite"}


def test_mup_follows_table_3_at_twice_the_base_width():
    from trainer.models.fno import mup_classes
    from trainer.optim import lr_groups
    kw = dict(lifting_channels=8, emb_dim=4)   # every class present: a two-layer lifting, FiLM
    std, mup = _fno(32, **kw), _fno(32, "mup", base_width=16, **kw)
    names = [n for n, _ in mup.named_parameters()]
    assert {n.replace("blocks.1.", "blocks.0.") for n in names} == set(CLASSES)
    assert mup_classes(mup) == {n: CLASSES[n.replace("blocks.1.", "blocks.0.")] for n in names}
    for optimizer, factor in TABLE_3.items():
        groups = lr_groups(mup, mup.parameters(), optimizer, 1e-3)
        assert groups[0]["lr_multiplier"] == 1.0    # metrics.csv logs group 0's lr: optim.lr's schedule
        got = {id(p): (g["lr"], g["lr_multiplier"]) for g in groups for p in g["params"]}
        for n, p in mup.named_parameters():
            f = factor[mup_classes(mup)[n]]
            assert got[id(p)] == (1e-3 * f, f), (optimizer, n)

    # init (Table 3's column, anchored at base_width): the standard draws of this width, rescaled
    s, m = dict(std.named_parameters()), dict(mup.named_parameters())
    for n in names:
        a, b = _flat(s[n]), _flat(m[n])
        if n.endswith("spectral.weight"):   # U[0,1)/32^2 -> (1/2 / 2 + (u - 1/2) / sqrt 2) / 16^2
            u = a * 32 * 32
            torch.testing.assert_close(b, (0.25 + (u - 0.5) / math.sqrt(2)) / 256, rtol=1e-5, atol=1e-9)
        elif n == "projection.0.weight":    # output: variance x 1/m
            torch.testing.assert_close(b, a / math.sqrt(2), rtol=1e-6, atol=0)
        elif n.endswith(("skip.bias", "projection.0.bias")):   # biases of layers reading the width: Theta(1)
            torch.testing.assert_close(b, a * math.sqrt(2), rtol=1e-6, atol=0)
        else:
            assert torch.equal(a, b), n


def _first_step_change(parametrization: str, width: int, seed: int, lr: float = 1e-2) -> tuple[float, float]:
    """RMS per coordinate of the change of the last Fourier layer's output (hidden features) and of the FNO's output
    on a fixed batch, after one Adam step from the seed's init (base width 16)."""
    from trainer.optim import lr_groups
    model = _fno(width, parametrization, base_width=16, seed=seed)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(8, 1, 16, 16, generator=g)
    y = 1 + torch.fft.irfftn(torch.fft.rfftn(x, dim=(-2, -1))[..., :4], s=(16, 16), dim=(-2, -1))   # smooth target
    features = {}
    model.blocks[-1].register_forward_hook(lambda _m, _i, out: features.__setitem__("h", out.detach()))
    optimizer = torch.optim.Adam(lr_groups(model, model.parameters(), "adam", lr), lr=lr)
    f0 = model(x)
    h0 = features["h"]
    torch.nn.functional.mse_loss(f0, y).backward()
    optimizer.step()
    with torch.no_grad():
        f1 = model(x)
    rms = lambda t: t.pow(2).mean().sqrt().item()   # noqa: E731
    return rms(features["h"] - h0), rms(f1 - f0.detach())


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def test_the_first_adam_step_moves_features_by_the_same_amount_at_every_width_under_mup():
    torch.set_num_threads(1)
    widths, seeds = [16, 32, 64, 128], range(4)
    slopes = {}
    for par in ("standard", "mup"):
        # geometric mean over seeds of each width's change: a width's own draws move it by tens of percent
        changes = [[_first_step_change(par, w, s) for s in seeds] for w in widths]
        for k, what in enumerate(("hidden", "output")):
            slopes[par, what] = _slope(widths, [math.exp(sum(math.log(c[k]) for c in cs) / len(cs)) for cs in changes])
    print("slopes of log(change) against log(width):", {f"{p}/{w}": round(s, 3) for (p, w), s in slopes.items()})
    for what in ("hidden", "output"):
        assert abs(slopes["mup", what]) <= 0.25, slopes
        assert slopes["standard", what] >= 0.75, slopes


# ---- through the Trainer -------------------------------------------------------------------------------------------
def test_the_trainer_gives_the_optimizer_the_models_groups_and_standard_trains_bit_identically(small_darcy, tmp_path):
    from trainer.config import load_config
    from trainer.train import Trainer
    base = [f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "train.max_steps=3", *SMALL_MODEL]
    runs = {"default": [], "standard": ['model.fno.parametrization="standard"'],
            "mup": ['model.fno.parametrization="mup"', "model.fno.width=32", "model.fno.base_width=16"],
            "mup_fsdp2": ['model.fno.parametrization="mup"', "model.fno.width=32", "model.fno.base_width=16",
                          "parallel.engine=fsdp2"]}
    out = {}
    for name, sets in runs.items():
        trainer = Trainer(load_config(CONFIG, [*base, f"run.name={name}", *sets]))
        groups = [(g["lr"], g.get("lr_multiplier"), len(g["params"])) for g in trainer.optimizer.param_groups]
        trainer.train()
        out[name] = groups, [p.detach().clone() for p in trainer.engine.full_parameters()]
    assert out["default"][0] == out["standard"][0] == [(1e-2, None, 12)]
    assert all(torch.equal(a, b) for a, b in zip(out["default"][1], out["standard"][1]))
    # width 32 = 2 x 16: the 4 hidden weights and the output weight at lr / 2, the rest at lr
    assert out["mup"][0] == out["mup_fsdp2"][0] == [(1e-2, 1.0, 7), (5e-3, 0.5, 5)]


@pytest.mark.slow
def test_mup_groups_under_ddp_fsdp2_and_zero_on_two_ranks_and_resume_exactly(small_darcy, tmp_path):
    """Engines hand the optimizer their own parameters: FSDP2 registers DTensors in their place, DeepSpeed stores
    complex weights as real ones under torch's parametrization names. The groups must still find them: fp32 FSDP2, and
    ZeRO-1 and -3 with real spectral weights, are DDP bit for bit at 2 ranks (test_fsdp2.py, test_deepspeed.py), so a
    group lost or misplaced shows as a difference. A resume must restore each group's lr (optim.lr x its factor)."""
    from test_comm import assert_consistent, run_losses, run_ranks
    mup = ['model.fno.parametrization="mup"', "model.fno.width=32", "model.fno.base_width=16", "train.max_steps=10"]
    fsdp2, real = mup + ["parallel.engine=fsdp2"], mup + ["model.fno.spectral_weights=real"]
    zero = [{"name": f"zero{s}", "overrides": real + ["parallel.engine=deepspeed", f"parallel.zero_stage={s}"]}
            for s in (1, 3)]
    spec = {"config": CONFIG, "base": [f"data.path={small_darcy}", f"run.out_dir={tmp_path / 'runs'}",
                                       "train.ckpt_every=0", *SMALL_MODEL],
            "runs": [{"name": "ddp", "overrides": mup}, {"name": "fsdp2", "overrides": fsdp2},
                     {"name": "staged", "overrides": fsdp2, "stop_after": 5},
                     {"name": "staged", "overrides": fsdp2, "resume": True},
                     {"name": "ddp_real", "overrides": real}, *zero]}
    r = run_ranks(2, spec, tmp_path)
    for name in ("ddp", "fsdp2", "staged", "ddp_real", "zero1", "zero3"):
        assert_consistent(r[name], name)
        assert r[name]["steps"] == 10, name
    for a, b in (("ddp", "fsdp2"), ("ddp_real", "zero1"), ("ddp_real", "zero3")):
        assert run_losses(tmp_path / "runs" / a) == run_losses(tmp_path / "runs" / b), (a, b)
        assert torch.equal(r[a]["params"][0], r[b]["params"][0]), (a, b)
    assert torch.equal(r["fsdp2"]["params"][0], r["staged"]["params"][0])


# ---- the study figure ----------------------------------------------------------------------------------------------
def _records() -> tuple[list[dict], dict]:
    """A synthetic LR x width x parametrization study: loss = 0.1 (1 + (log10 lr - log10 best)^2), the best LR falling
    as 1/width under standard and fixed under mup; three repeats, one an outlier the median must ignore; one
    diverged (NaN) repeat, a failed cell and an unrelated record."""
    best = {("standard", w): 1e-2 * 8 / w for w in (8, 16, 32, 64)} | {("mup", w): 3e-3 for w in (8, 16, 32, 64)}
    lrs = [1e-4 * 10 ** (k / 2) for k in range(7)]       # 1e-4 .. 1e-1, half decades
    records = []
    for (par, w), b in best.items():
        for lr in lrs:
            loss = 0.1 * (1 + (math.log10(lr) - math.log10(b)) ** 2)
            for rep, factor in enumerate((1.0, 1.01, 50.0 if lr == lrs[0] else 1.02)):
                records.append({"status": "ok", "repeat": rep, "train_loss": loss * factor,
                                "test_rel_l2": 2 * loss * factor, "axes": {"model.fno.width": w, "optim.lr": lr,
                                                                         "model.fno.parametrization": par,
                                                                         "world_size": 1}})
    records[5]["train_loss"] = float("nan")
    records.append({"status": "failed", "error": "exit 1", "axes": {"model.fno.width": 8, "optim.lr": 1.0,
                                                                    "model.fno.parametrization": "mup"}})
    records.append({"status": "ok", "train_loss": 1e-9, "axes": {"world_size": 2}})
    # the grid point nearest each best LR (log distance)
    expected = {k: min(lrs, key=lambda lr: abs(math.log(lr / b))) for k, b in best.items()}
    return records, expected


def test_lr_transfer_figure_and_best_lr_per_width(tmp_path):
    from launch.study_proxy import best_lr, lr_curves, write_lr_transfer
    records, expected = _records()
    path, markdown = write_lr_transfer(tmp_path, json.loads(json.dumps(records)))   # as read from results.jsonl
    assert path == tmp_path / "lr_transfer.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = lr_curves(records)
    assert sorted(curves) == ["mup", "standard"]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in markdown.splitlines() if line.startswith("| w")}
    for (par, w), lr in expected.items():
        for k, metric in enumerate(("train_loss", "test_rel_l2")):
            assert best_lr(curves[par][(w,)], metric)[0] == lr, (par, w, metric)
            # table columns: standard (train, test), mup (train, test)
            assert rows[f"width {w}"][2 * (par == "mup") + k].startswith(f"{lr:.3g} ("), (par, w, rows)
    assert "- mup, by final train loss: best learning rate 0.00316 to 0.00316 across the curves (x1;" in markdown
    assert "- standard, by final train loss: best learning rate 0.001 to 0.01 across the curves (x10;" in markdown
    assert "![loss against learning rate per width](lr_transfer.png)" in markdown
    # the median of three repeats: the outlier (x50 at the lowest LR) does not move the point
    assert curves["mup"][(8,)][1e-4]["train_loss"] == pytest.approx(0.1 * (1 + (-4 - math.log10(3e-3)) ** 2) * 1.01)


def test_no_lr_transfer_without_an_lr_and_a_width_axis(tmp_path):
    from launch.study_proxy import write_lr_transfer
    records = [{"status": "ok", "train_loss": 0.1, "axes": {"world_size": w, "comm.compressor": "none"}}
               for w in (1, 2)]
    assert write_lr_transfer(tmp_path, records) is None
    one_lr = [{"status": "ok", "train_loss": 0.1, "axes": {"model.fno.width": w, "optim.lr": 1e-3}} for w in (8, 16)]
    assert write_lr_transfer(tmp_path, one_lr) is None
    assert not (tmp_path / "lr_transfer.png").exists()


def test_a_width_bundled_with_other_keys_is_read_from_the_records_settings(tmp_path):
    from launch.study_proxy import best_lr, lr_curves
    records = [{"status": "ok", "train_loss": (lr - 1e-3 * w / 8) ** 2 + 1, "test_rel_l2": 1.0,
                "axes": {"size": f"w{w}", "optim.lr": lr},
                "settings": {"model.fno.width": w, "model.fno.projection_channels": 4 * w, "optim.lr": lr}}
               for w in (8, 16) for lr in (1e-3, 2e-3)]
    curves = lr_curves(records)
    assert set(curves["all cells"]) == {(8, "size=w8"), (16, "size=w16")}
    assert best_lr(curves["all cells"][(16, "size=w16")], "train_loss")[0] == 2e-3

"""EDM over an operator backbone (trainer/diffusion/edm.py), the weight EMA (trainer/ema.py), the diffusion trainer
(trainer/diffusion/trainer.py) and `fieldtrain sample` (trainer/diffusion/sampling.py).

Analytic anchors: with a backbone that outputs 0, EDM's preconditioned denoiser is c_skip x, which is exactly the
denoiser of N(0, sigma_data^2) data; the EDM loss of that exact denoiser on that data is 1 at every sigma (the
weight lambda = 1/c_out^2 and the posterior variance is c_out^2). The EMA profiles are closed-form products.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import REPO, fieldtrain
from test_comm import assert_consistent, run_losses, run_ranks
from test_comm import engine_parity as assert_parity

CONFIG = str(REPO / "configs" / "darcy_edm.toml")
TINY = ["model.fno.width=12", "model.fno.modes=[4, 4]", "model.fno.n_layers=2", "model.fno.projection_channels=16",
        "model.fno.padding=0", "model.edm.emb_dim=16", "model.edm.eval_conditions=4", "model.edm.eval_members=4",
        "model.edm.eval_steps=4", "data.batch_size=8", "train.progress=false", "train.log_every=1",
        "train.eval_every=8", "optim.lr=1e-2", "optim.warmup_steps=0"]


class Zero(nn.Module):
    """A backbone whose output F is 0 (or `value`), recording what it was given."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.value, self.seen = value, {}

    def forward(self, x, emb):
        self.seen = {"x": x, "emb": emb}
        return torch.full_like(x[:, :1], self.value)


def precond(sd: float, value: float = 0.0):
    from trainer.diffusion.edm import EDMConfig, EDMPrecond
    m = EDMPrecond(Zero(value), sd, emb_dim=8)
    m.cfg = EDMConfig(conditional=False)
    return m


# ---- preconditioning and loss, against closed forms ----------------------------------------------------------------
def test_zero_network_gives_the_exact_gaussian_denoiser_and_table1_coefficients():
    from trainer.diffusion.analytic import gaussian_denoiser
    sd = 0.7
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 0.7, 5.0, 80.0], dtype=torch.float64)
    exact = gaussian_denoiser(torch.zeros(36, dtype=torch.float64), sd ** 2 * torch.eye(36, dtype=torch.float64))
    D = precond(sd)(x, sigma)
    assert torch.allclose(D, exact(x.flatten(1), sigma).reshape(x.shape), rtol=1e-12, atol=1e-14)
    # F = 1 everywhere: D - c_skip x = c_out; the backbone saw c_in x (in fp32); c_noise = ln(sigma)/4 reached the
    # embedding (checked through a recorded call)
    m = precond(sd, value=1.0)
    seen = {}
    m.embed.register_forward_hook(lambda mod, args, out: seen.update(c_noise=args[0]))
    D1 = m(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(D1 - sd ** 2 / (s ** 2 + sd ** 2) * x, (s * sd / (s ** 2 + sd ** 2).sqrt()).expand_as(x),
                          rtol=1e-6, atol=1e-12)
    assert torch.allclose(m.backbone.seen["x"].double(), x / (s ** 2 + sd ** 2).sqrt(), rtol=1e-6)
    assert torch.allclose(seen["c_noise"].double(), sigma.log() / 4, rtol=1e-6)


def test_edm_loss_of_the_exact_denoiser_is_one_at_every_sigma():
    """(D - y) / c_out ~ N(0, 1) per element whatever sigma is, so lambda (D - y)^2 has mean 1 and variance 2: the
    mean over N elements is within 5 sqrt(2/N) of 1 (5 standard errors)."""
    from trainer.diffusion.edm import edm_loss, edm_weight
    sd = 0.5
    torch.manual_seed(0)
    y = sd * torch.randn(4096, 1, 8, 8, dtype=torch.float64)
    loss, _ = edm_loss(precond(sd), {"x": y[:, :0], "y": y}, None)
    n = y.numel()
    assert abs(loss.item() - 1) < 5 * math.sqrt(2 / n), loss.item()
    s = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    assert torch.allclose(edm_weight(s, sd) * (s * sd / (s ** 2 + sd ** 2).sqrt()) ** 2, torch.ones(3, dtype=torch.float64))


def test_sigma_data_comes_from_the_store_statistics():
    from data.loader import ChannelNormalizer
    from trainer.diffusion.edm import EDMConfig, _sigma_data
    from trainer.registry import DataSpec
    norm = ChannelNormalizer([0.0, 3.0], [2.0, 1e-6])   # a non-constant channel and a (nearly) constant one
    data = DataSpec((1, 4, 4), (2, 4, 4), norm)
    expect = math.sqrt(((2 / (2 + 1e-6)) ** 2 + (1e-6 / 2e-6) ** 2) / 2)   # channel c: std_c / (std_c + eps)
    assert _sigma_data(EDMConfig(), data) == pytest.approx(expect, rel=1e-6)
    assert _sigma_data(EDMConfig(sigma_data=0.3), data) == 0.3


@pytest.mark.parametrize("sets, says", [
    (["model.edm.backbone=unet"], "'model.edm.backbone' = 'unet'; allowed: 'fno'"),
    (["model.edm.eval_sampler=ddpm"], "'model.edm.eval_sampler' = 'ddpm'; allowed: 'euler'"),
    (["model.edm.sigma_min=100.0"], "need sigma_min < sigma_max"),
    (["model.edm.emb_dim=15"], "'model.edm.emb_dim' = 15; must be even"),
    (["ema.kind=linear"], "'ema.kind' = 'linear'; allowed: 'none', 'power', 'halflife'"),
    (["ema.std=0.5"], "'ema.std' = 0.5; must be in (0, 0.2887)"),
])
def test_bad_diffusion_config_names_the_key(sets, says):
    from trainer.config import load_config
    with pytest.raises(ValueError, match=None) as e:
        load_config(CONFIG, sets)
    assert says in str(e.value), str(e.value)


# ---- the EMA's profiles ---------------------------------------------------------------------------------------------
class OneWeight:
    """An engine holding one scalar parameter, for WeightEMA."""

    def __init__(self):
        self.w = torch.zeros(1, dtype=torch.float64)

    def master_weights(self):
        return {"w": self.w}

    def load_master_weights(self, values):
        self.w.copy_(values["w"])


def _ema(kind: str, **kw):
    from trainer.config import EMAConfig
    from trainer.ema import WeightEMA
    engine = OneWeight()
    ema = WeightEMA(EMAConfig(kind=kind, **kw), engine)
    ema.shadow["w"] = ema.shadow["w"].double()
    return ema, engine


def _profile(ema, engine, t: int) -> torch.Tensor:
    """The weight the average gives each of t steps: feed unit impulses (the EMA is linear in the weights)."""
    out = []
    for tau in range(t):
        e, eng = _ema(ema.cfg.kind, std=ema.cfg.std, halflife_steps=ema.cfg.halflife_steps,
                      rampup_ratio=ema.cfg.rampup_ratio)
        for k in range(t):
            eng.w.fill_(1.0 if k == tau else 0.0)
            e.update()
        out.append(e.shadow["w"].item())
    return torch.tensor(out, dtype=torch.float64)


def test_power_ema_has_edm2s_profile_and_width():
    """EDM2: beta_t = (1 - 1/t)^(gamma+1) gives step tau the weight (1 - beta_tau) (tau/t)^(gamma+1) exactly; EDM2
    quotes gamma = 6.94 for sigma_rel = 0.10 and 16.97 for 0.05."""
    from trainer.ema import power_gamma, power_sigma_rel
    assert power_gamma(0.10) == pytest.approx(6.94, abs=5e-3) and power_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    for std in (0.03, 0.1, 0.25):
        assert power_sigma_rel(power_gamma(std)) == pytest.approx(std, rel=1e-12)
    ema, engine = _ema("power", std=0.1)
    t = 40
    w = _profile(ema, engine, t)
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    beta = (1 - 1 / tau) ** (ema.gamma + 1)
    assert torch.allclose(w, (1 - beta) * (tau / t) ** (ema.gamma + 1), rtol=1e-12, atol=1e-300)
    assert w.sum().item() == pytest.approx(1.0, rel=1e-12)
    # its width relative to the run tends to sigma_rel (O(1/t) off at t steps): the closed form at t = 20000
    t = 20000
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    beta = (1 - 1 / tau) ** (ema.gamma + 1)
    w = (1 - beta) * torch.exp((ema.gamma + 1) * (tau / t).log())
    x = tau / t
    mean = (w * x).sum()
    assert ((w * (x - mean) ** 2).sum().sqrt()).item() == pytest.approx(0.1, rel=1e-3)


def test_halflife_ema_halves_each_halflife_after_its_ramp_up():
    ema, engine = _ema("halflife", halflife_steps=5.0, rampup_ratio=0.5)
    w = _profile(ema, engine, 30)
    # past the ramp-up (0.5 t >= 5 from t = 10 on), consecutive steps' weights differ by beta = 0.5 ** (1/5)
    ratios = w[10:-1] / w[11:]   # an older step weighs beta times the next one
    assert torch.allclose(ratios, torch.full_like(ratios, 0.5 ** (1 / 5)), rtol=1e-12)
    # the rest stays on the starting weights (EDM's EMA starts as a copy of the network): prod_t beta_t
    start = math.prod(0.5 ** (1 / min(5.0, 0.5 * t)) for t in range(1, 31))
    assert w.sum().item() + start == pytest.approx(1.0, rel=1e-12)


def test_swapped_puts_the_average_in_and_the_trained_weights_back():
    ema, engine = _ema("power", std=0.1)
    for v in (1.0, 2.0, 3.0):
        engine.w.fill_(v)
        ema.update()
    avg = ema.shadow["w"].clone()
    with ema.swapped():
        assert torch.equal(engine.w, avg) and avg.item() != 3.0
    assert engine.w.item() == 3.0


# ---- training under every engine, resume, EMA -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(small_darcy, tmp_path_factory):
    """One 2-rank launch: EDM under DDP, FSDP2 and ZeRO-1/2/3, fp32 and compressed, and N/2 + N/2 resumes."""
    tmp = tmp_path_factory.mktemp("edm_engines")
    base = [f"data.path={small_darcy}", f"run.out_dir={tmp / 'runs'}", "train.ckpt_every=0", *TINY]
    steps = ["train.max_steps=16"]
    zero = lambda s: ["parallel.engine=deepspeed", f"parallel.zero_stage={s}"]   # noqa: E731
    runs = [{"name": "ddp", "overrides": steps},
            {"name": "fsdp2", "overrides": steps + ["parallel.engine=fsdp2"]},
            *[{"name": f"z{s}", "overrides": steps + zero(s)} for s in (1, 3)],   # ZeRO-2 runs ZeRO-1's exchange
            {"name": "ddp_powersgd", "overrides": steps + ["comm.compressor=powersgd"]},
            {"name": "z3_int8", "overrides": steps + zero(3) + ["comm.compressor=int8"]}]
    # resume: DDP with error feedback, FSDP2's DTensor EMA shards, ZeRO-3's flat partitions of it
    for name, extra in (("ddp", ["comm.compressor=int8"]), ("fsdp2", ["parallel.engine=fsdp2"]), ("z3", zero(3))):
        o = steps + extra
        runs += [{"name": f"{name}_staged", "overrides": o, "stop_after": 8},
                 {"name": f"{name}_staged", "overrides": o, "resume": True},
                 {"name": f"{name}_straight", "overrides": o}]
    results = run_ranks(2, {"config": CONFIG, "base": base, "runs": runs}, tmp)
    out = tmp / "out-torchrun-2"
    for name in results:
        results[name]["ema_weights"] = [torch.load(out / f"{name}.ema.rank{r}.pt") for r in range(2)]
    results["runs_dir"] = tmp / "runs"
    return results


@pytest.mark.slow
def test_edm_trains_under_every_engine_and_compressor(engines):
    for name in ("ddp", "fsdp2", "z1", "z3", "ddp_powersgd", "z3_int8"):
        r = engines[name]
        assert_consistent(r, name)
        assert r["steps"] == 16 and r["skipped_steps"] == 0 and r["ema"] == "power", name
        losses = run_losses(engines["runs_dir"] / name)
        # the EDM loss starts near 1 (test_edm_loss_of_the_exact_denoiser...: lambda = 1/c_out^2 normalises it) and
        # falls slowly on this tiny problem: 16 steps take fp32 DDP's mean of the last 4 to 0.83x that of the first 4
        assert sum(losses[-4:]) < 0.9 * sum(losses[:4]), (name, losses)
        assert math.isfinite(r["test_crps"]) and 0 < r["test_rel_l2"] < 1, (name, r["test_rel_l2"])
    # fp32 sharded engines run DDP's arithmetic (test_fsdp2.py / test_deepspeed.py tolerances): same trajectory
    for name in ("fsdp2", "z1", "z3"):
        assert_parity(engines, engines["runs_dir"], "ddp", name, exact=False, trains=False)


@pytest.mark.slow
def test_resume_is_bit_identical_with_the_ema_and_each_ranks_noise(engines):
    for name in ("ddp", "fsdp2", "z3"):
        a, b = engines[f"{name}_straight"], engines[f"{name}_staged"]
        assert b["steps"] == 16
        assert torch.equal(a["params"][0], b["params"][0]), name
        for r in range(2):
            ea, eb = a["ema_weights"][r], b["ema_weights"][r]
            assert all(torch.equal(ea[k], eb[k]) for k in ea), (name, r)
        assert run_losses(engines["runs_dir"] / f"{name}_straight") == run_losses(engines["runs_dir"] / f"{name}_staged")


@pytest.mark.slow
def test_the_ema_is_not_the_trained_weights(engines):
    ema = engines["ddp"]["ema_weights"][0]
    flat = torch.cat([torch.view_as_real(t).flatten() if t.is_complex() else t.flatten() for t in ema.values()])
    raw = engines["ddp"]["params"][0]
    assert flat.shape == raw.shape and not torch.equal(flat, raw)
    assert (flat - raw).abs().max() < 10 * raw.abs().max()   # an average of the trajectory, not something else


# ---- `fieldtrain sample` --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(small_darcy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edm_run")
    r = fieldtrain("train", CONFIG, *sum((["--set", s] for s in [f"data.path={small_darcy}", f"run.out_dir={tmp}",
                                                                   "run.name=edm", "train.max_steps=12", *TINY]), []))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "edm"


def test_diffusion_run_writes_its_evaluation_and_figures(trained):
    s = json.loads((trained / "summary.json").read_text())
    assert s["test_rel_l2"] == s["test_ens_mean_rel_l2"] and s["eval_members"] == 4 and s["ema"] == "power"
    assert 0 < s["test_spread_skill"] and math.isfinite(s["test_spectrum_error"])
    for f in ("samples.png", "spectra.png", "eval.json"):
        assert (trained / "figures" / f).stat().st_size > 0


def test_sample_writes_an_evaluated_ensemble_store_and_resumes(trained, small_darcy, tmp_path):
    from data.samples import open_samples
    out = tmp_path / "s.zarr"
    args = ["sample", str(trained), "--n", "3", "--cond", small_darcy, "--cond-start", "80", "--conditions", "5",
            "--chunk-size", "2", "--steps", "4", "--out", str(out), "--no-progress", "--report", str(tmp_path / "rep")]
    r = fieldtrain(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    store = open_samples(str(out))
    assert store.read().shape == (5, 3, 1, 17, 17) and store.read(name="truth").shape == (5, 1, 17, 17)
    assert store.meta["nfe"] == 4 and store.meta["weights"] == "ema"   # DPM-Solver++(2M): one evaluation per step
    rep = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert rep["conditions"] == 5 and rep["members"] == 3 and 0 < rep["ens_mean_rel_l2"] < 1
    again = fieldtrain(*args)
    assert again.returncode == 0 and "(0 / 3)" in again.stdout, again.stdout   # every chunk was there
    assert (open_samples(str(out)).read() == store.read()).all()


@pytest.mark.parametrize("extra, says", [
    (["--sampler", "ddpm"], "'sampler' = 'ddpm'; allowed: 'euler'"),
    (["--schedule", "cosine"], "'schedule' = 'cosine'; allowed:"),
    (["--steps", "0"], "'steps'"),
    (["--observe", "1.5"], "--observe = 1.5"),
    (["--sigmas", "80,1,10,0"], "must be strictly decreasing"),
    (["--sigmas", "80,x"], "--sigmas = '80,x'"),
])
def test_sample_refuses_bad_input_naming_it(trained, small_darcy, tmp_path, extra, says, caplog):
    """In this process (`fieldtrain`'s main, as the console script runs it): exit 2, one line naming the key."""
    from launch.cli import main
    rc = main(["sample", str(trained), "--n", "2", "--cond", small_darcy, "--out", str(tmp_path / "x.zarr"), *extra])
    assert rc == 2 and says in caplog.text, caplog.text[-2000:]
    assert not (tmp_path / "x.zarr").exists()


def test_sample_refuses_a_condition_store_of_another_grid(trained, tmp_path):
    from data.darcy import write_darcy_dataset
    other = str(tmp_path / "other.zarr")
    write_darcy_dataset(other, n=8, res=9, seed=0, chunk_size=8, fine_factor=2)
    r = fieldtrain("sample", str(trained), "--n", "2", "--cond", other, "--out", str(tmp_path / "x.zarr"))
    assert r.returncode == 2 and "grid (9, 9) differs from the model's (17, 17)" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x.zarr").exists()


# ---- trajectories: w_{k+1} given w_k, rolled out ---------------------------------------------------------------------
def test_trajectory_pairs_are_consecutive_states_under_pooled_statistics():
    from data.loader import ChannelNormalizer
    from trainer.diffusion.edm import EDMConfig, model_pairs, to_physical, trajectory_stats
    from trainer.registry import DataSpec
    torch.manual_seed(1)
    traj = torch.randn(64, 5, 4, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])[:, None, None] + 7.0   # (B, T, grid)
    m_c, s_c = traj.mean((0, 2, 3)), traj.std((0, 2, 3), unbiased=False)
    data = DataSpec((1, 4, 4), (5, 4, 4), ChannelNormalizer(m_c.tolist(), s_c.tolist()))
    mean, std = trajectory_stats(data)   # pooled over equal-count channels: the statistics of all values at once
    assert mean == pytest.approx(traj.mean().item(), rel=1e-5)
    assert std == pytest.approx(traj.std(unbiased=False).item(), rel=1e-5)
    core = precond(1.0)
    core.cfg = EDMConfig(pairs="trajectory")
    batch = {"x": traj[:, :1], "y": data.target_norm.encode(traj)}
    cond, target = model_pairs(core, batch, data, k=2)
    assert torch.allclose(to_physical(core, data, cond), traj[:, 2:3], atol=1e-4)
    assert torch.allclose(to_physical(core, data, target), traj[:, 3:4], atol=1e-4)
    cond, target = model_pairs(core, batch, data)   # a random k per sample: still consecutive states
    for b in range(8):
        k = int(torch.argmin((traj[b] - to_physical(core, data, cond)[b]).abs().flatten(1).amax(1)))
        assert torch.allclose(to_physical(core, data, target)[b, 0], traj[b, k + 1], atol=1e-4)


@pytest.fixture(scope="module")
def small_ns(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("ns") / "ns.zarr")
    r = fieldtrain("data", "generate", "navier_stokes", "--n", "48", "--res", "16", "--chunk-size", "16", "--out",
                   url, "--workers", "1", "--param", "T=2.0", "--param", "record_steps=4", "--param", "fine_factor=1",
                   "--param", "dt=0.01")
    assert r.returncode == 0, r.stderr[-2000:]
    return url


def test_a_trajectory_model_trains_and_rolls_out_ensembles(small_ns, tmp_path):
    from data.samples import open_samples
    sets = [f"data.path={small_ns}", f"run.out_dir={tmp_path}", "run.name=ns", "train.max_steps=6",
            "model.edm.pairs=trajectory", *TINY]
    r = fieldtrain("train", CONFIG, *sum((["--set", s] for s in sets), []))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ns" / "summary.json").read_text())
    assert s["steps"] == 6 and math.isfinite(s["test_crps"])
    out = tmp_path / "roll.zarr"
    r = fieldtrain("sample", str(tmp_path / "ns"), "--n", "2", "--cond", small_ns, "--cond-start", "32",
                   "--conditions", "3", "--rollout", "2", "--rollout-from", "1", "--steps", "3", "--out", str(out),
                   "--no-progress", "--report", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    store = open_samples(str(out))
    assert store.read().shape == (3, 2, 2, 1, 16, 16)        # rows x members x steps x (1, grid)
    from data.store import FieldDataset
    _, y = FieldDataset(small_ns).read(32, 35)
    assert (store.read(name="truth") == y[:, 2:4, None]).all()   # the states after the start (state 1)
    rep = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert [row["step"] for row in rep["rollout"]] == [1, 2] and (tmp_path / "rep" / "rollout.png").exists()
    r = fieldtrain("sample", str(tmp_path / "ns"), "--n", "2", "--cond", small_ns, "--rollout", "4",
                   "--out", str(tmp_path / "bad.zarr"))
    assert r.returncode == 2 and "--rollout = 4; from state 0 the store holds the truth for at most 3" in r.stderr


def test_dps_sampling_pulls_the_ensemble_to_the_observed_points(trained, small_darcy, tmp_path):
    """--observe: DPS guidance descends on ||y - A D(x)|| after every step, so at the observed points the guided
    ensemble mean sits closer to the truth than the unguided one (what must hold; DPS is not exact)."""
    from data.samples import open_samples
    from trainer.diffusion.inverse import random_points
    misfit = {}
    for name, extra in (("free", []), ("dps", ["--observe", "0.05", "--zeta", "5"])):
        out = tmp_path / f"{name}.zarr"
        r = fieldtrain("sample", str(trained), "--n", "4", "--cond", small_darcy, "--cond-start", "80", "--conditions",
                       "4", "--steps", "6", "--sampler", "heun", "--out", str(out), "--no-progress",
                       "--report", str(tmp_path / name), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        store = open_samples(str(out))
        obs = random_points((1, 17, 17), 0.05, torch.Generator().manual_seed(0))   # SampleJob's points (seed 0)
        mean, truth = torch.from_numpy(store.read()).mean(1), torch.from_numpy(store.read(name="truth"))
        misfit[name] = (obs.observe(mean) - obs.observe(truth)).norm() / obs.observe(truth).norm()
    assert misfit["dps"] < misfit["free"], misfit

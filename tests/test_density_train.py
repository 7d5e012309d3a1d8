"""Diffusion samplers of unnormalised densities trained by the Trainer (trainer/density/model.py, trainer.py): the
global batch split over ranks, exact resume, the engines, the bounds on log Z, bad input, `fieldtrain sampler`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, fieldtrain
from test_comm import assert_consistent, run_losses, run_ranks

CONFIG = str(REPO / "configs" / "gmm25_tb.toml")
TINY = ["model.density_sampler.T=10", "model.density_sampler.width=16", "model.density_sampler.eval_samples=64",
        "train.progress=false", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0", "optim.lr=1e-2"]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.parametrize("sets_, says", [
    (["model.density_sampler.method=ddpm"], "'model.density_sampler.method' = 'ddpm'; allowed: 'pis', 'dds', 'tb'"),
    (["model.density_sampler.T=0"], "'model.density_sampler.T' = 0; must be an integer >= 1"),
    (["model.density_sampler.sigma=0.0"], "'model.density_sampler.sigma' = 0.0; must be > 0"),
    (["model.density_sampler.method=pis"], "method 'pis' differentiates through on-policy paths"),
    (["model.density_sampler.ou_schedule=cosine"], "'model.density_sampler.ou_schedule' = 'cosine'; allowed: "),
    (["model.density_sampler.ou_alpha=-1.0"], "'model.density_sampler.ou_alpha' = -1.0; must be > 0"),
    (["model.density_sampler.ls_burn_in=200"], "'model.density_sampler.ls_burn_in' = 200; must be in [0, ls_steps"),
])
def test_bad_sampler_config_names_the_key(sets_, says):
    from trainer.config import load_config
    with pytest.raises(ValueError) as e:
        load_config(CONFIG, sets_)
    assert says in str(e.value), str(e.value)


def test_bad_targets_are_refused_before_anything_is_written(tmp_path):
    r = fieldtrain("sampler", "train", CONFIG, *sets(f"run.out_dir={tmp_path}", "model.density_sampler.target=nope"))
    assert r.returncode == 2 and "'target.name' = 'nope'; allowed: 'gmm25'" in r.stderr, r.stderr[-2000:]
    assert not any(tmp_path.iterdir())
    # what every rank (and the launcher's preflight) builds first: the source, which tries the target
    from trainer.config import load_config
    from trainer.density.trainer import SimulationSource
    for fn, says in (("nan_density", "NaN"), ("wrong_shape", "shape")):
        cfg = load_config(CONFIG, [f"model.density_sampler.target=tests.user_targets:{fn}",
                                   "model.density_sampler.target_params={dim = 2}"])
        with pytest.raises(ValueError) as e:
            SimulationSource(cfg, 0, 1)
        assert f"target 'tests.user_targets:{fn}'" in str(e.value) and says in str(e.value), str(e.value)
    r = fieldtrain("sampler", "train", str(REPO / "configs" / "darcy_fno.toml"))
    assert r.returncode == 2 and "trains density samplers" in r.stderr


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> dict:
    """One SGD step on the global batch of 32 trajectories, as 1 x 32 and as 2 x 16 (and a short run per engine)."""
    tmp = tmp_path_factory.mktemp("density_split")
    base = [f"run.out_dir={tmp / 'runs'}", *TINY, "optim.name=sgd", "optim.momentum=0.0", "optim.lr=0.1"]
    out = {}
    for world, n in ((1, 32), (2, 16)):
        runs = [{"name": f"{m}_{world}", "overrides": [f"model.density_sampler.method={m}", "train.max_steps=1",
                                                        f"data.batch_size={n}"]
                 + (["model.density_sampler.exploration_std=0.0"] if m == "pis" else [])}
                for m in ("tb", "vargrad", "pis")]
        out[world] = run_ranks(world, {"config": CONFIG, "base": base, "runs": runs}, tmp)
    return out


@pytest.mark.slow
def test_the_global_batch_split_over_ranks_gives_the_same_step(split):
    """Each row's noise is drawn for the global batch by (seed, step), so 1 x 32 and 2 x 16 simulate the same
    trajectories; the engine averages the ranks' mean losses, i.e. the global mean, so one SGD step moves the
    parameters by the same amount up to float32 rounding of sums taken in another order (~1e-7 relative)."""
    for m in ("tb", "vargrad", "pis"):
        a, b = split[1][f"{m}_1"]["params"][0], split[2][f"{m}_2"]["params"][0]
        assert_consistent(split[2][f"{m}_2"], m)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (m, (a - b).abs().max())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("density_runs")
    base = [f"run.out_dir={tmp / 'runs'}", *TINY, "data.batch_size=32", "model.density_sampler.eval_samples=256"]
    steps = ["train.max_steps=30"]
    runs = [{"name": "tb", "overrides": steps},
            {"name": "dds", "overrides": steps + ["model.density_sampler.method=dds",   # DDS's own schedule
                                                  "model.density_sampler.exploration_std=0.0",
                                                  "model.density_sampler.ou_schedule=cos_sq"]},
            {"name": "vargrad_fsdp2", "overrides": steps + ["model.density_sampler.method=vargrad",
                                                            "parallel.engine=fsdp2", "comm.compressor=int8"]},
            {"name": "tb_z3", "overrides": steps + ["parallel.engine=deepspeed", "parallel.zero_stage=3"]},
            {"name": "tb_staged", "overrides": steps, "stop_after": 15},
            {"name": "tb_staged", "overrides": steps, "resume": True}]
    ls = steps + ["model.density_sampler.local_search=true", "model.density_sampler.buffer_size=256",
                  "model.density_sampler.ls_every=10", "model.density_sampler.ls_steps=5",
                  "model.density_sampler.ls_burn_in=2"]
    runs += [{"name": "tb_ls", "overrides": ls}, {"name": "tb_ls_staged", "overrides": ls, "stop_after": 15},
             {"name": "tb_ls_staged", "overrides": ls, "resume": True}]
    results = run_ranks(2, {"config": CONFIG, "base": base, "runs": runs}, tmp)
    results["runs_dir"] = tmp / "runs"
    return results


@pytest.mark.slow
def test_samplers_train_under_the_engines_and_bound_log_z(trained):
    for name in ("tb", "dds", "vargrad_fsdp2", "tb_z3"):
        r = trained[name]
        assert_consistent(r, name)
        assert r["steps"] == 30 and r["skipped_steps"] == 0, name
        # ELBO <= log Z <= EUBO for any sampler (Jensen, both ways); with 256 samples the Monte-Carlo error of each
        # is far below the gaps of a 30-step sampler (measured > 1 nat)
        assert r["elbo"] < r["log_z"] < r["eubo"], (name, r["elbo"], r["eubo"])
        assert r["iw_log_z"] >= r["elbo"] and 0 < r["ess"] <= 1 and r["w2_squared"] > 0, name
        assert 0 < r["elbo_se"] < r["log_z"] - r["elbo"], name   # the gap is resolved by the 256 samples
        assert (trained["runs_dir"] / name / "figures" / "samples.png").stat().st_size > 0
    losses = run_losses(trained["runs_dir"] / "tb")
    assert sum(losses[-5:]) < sum(losses[:5]), losses   # TB's loss starts at (log Z_theta + log w)^2 and falls


@pytest.mark.slow
def test_resume_is_bit_identical(trained):
    a, b = trained["tb"], trained["tb_staged"]
    assert b["steps"] == 30 and torch.equal(a["params"][0], b["params"][0])
    assert run_losses(trained["runs_dir"] / "tb") == run_losses(trained["runs_dir"] / "tb_staged")
    assert a["elbo"] == b["elbo"]


@pytest.mark.slow
def test_local_search_trains_from_a_checkpointed_replay_buffer(trained):
    """Every other step trains on backward trajectories from the buffer (TB + local search, Sendera et al. 2024);
    the buffer (each rank's shard) is in the checkpoint, so a resumed run is still the same run bit for bit."""
    a, b = trained["tb_ls"], trained["tb_ls_staged"]
    assert_consistent(a, "tb_ls")
    assert a["steps"] == b["steps"] == 30 and a["skipped_steps"] == 0
    assert torch.equal(a["params"][0], b["params"][0])
    assert run_losses(trained["runs_dir"] / "tb_ls") == run_losses(trained["runs_dir"] / "tb_ls_staged")
    assert not torch.equal(a["params"][0], trained["tb"]["params"][0])   # the buffer steps changed the training
    assert a["elbo"] < a["log_z"] < a["eubo"]
    # gfn-diffusion's two buffers, one shard per rank each: the policy's samples (15 forward steps x 32 rows into a
    # 128-row shard) and local search's accepted proposals (3 searches x 3 kept steps x 32 chains at most)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    ckpt = trained["runs_dir"] / "tb_ls" / "checkpoints"
    dcp_to_torch_save(ckpt / (ckpt / "latest").read_text().strip(), ckpt.parent / "last.pt")
    state = torch.load(ckpt.parent / "last.pt", weights_only=False)
    from trainer.density.targets import get_target
    for r in ("rank0", "rank1"):
        policy, searched = state["buffer"][r], state["buffer_ls"][r]
        assert int(policy["added"]) == 15 * 32 and int(policy["size"]) == 128
        assert 0 < int(searched["added"]) <= 3 * 3 * 32 and int(searched["size"]) == min(int(searched["added"]), 128)
        n = int(searched["size"])
        assert torch.allclose(searched["log_reward"][:n], get_target("gmm25").log_prob(searched["x"][:n]))


@pytest.mark.slow
def test_sampler_eval_reports_the_estimates(trained):
    run = trained["runs_dir"] / "tb"
    r = fieldtrain("sampler", "eval", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("ELBO", "(standard error)", "EUBO", "|ELBO - log Z|", "ESS", "W2^2 to exact samples"):
        assert row in r.stdout, r.stdout
    saved = json.loads((run / "figures" / "eval.json").read_text())
    assert saved["elbo"] == trained["tb"]["elbo"]   # the same noise, the same checkpoint: the same estimate


def test_langevin_parametrisation_adds_the_clipped_target_score():
    """u = NN1(t, x) + NN2(t) clip(grad log pi(x)): with NN1's and NN2's last layers at zero the drift is 0 (the
    reference process); with NN2's output set to 1 it is the target's score, clipped at grad_clip."""
    from trainer.density.model import DensitySampler, DensitySamplerConfig
    from trainer.density.targets import get_target
    target = get_target("gaussian", mu=[3.0, -1.0], std=0.5, dim=2)
    m = DensitySampler(DensitySamplerConfig(target="gaussian", langevin=True, grad_clip=5.0), target)
    x, t = torch.tensor([[0.0, 0.0], [3.0, -1.0], [3.5, -1.0]]), torch.full((3,), 0.3)
    assert torch.equal(m.drift(t, x)[0], torch.zeros(3, 2))
    torch.nn.init.constant_(m.policy.langevin[-1].bias, 1.0)
    score = (torch.tensor([3.0, -1.0]) - x) / 0.25          # grad log N(x; mu, 0.5^2 I)
    assert torch.allclose(m.drift(t, x)[0], score.clamp(-5, 5))
    # the network's outputs are clipped last (gfn-diffusion's --clipping): with out_clip 2 the same drift stops at 2
    m = DensitySampler(DensitySamplerConfig(target="gaussian", langevin=True, grad_clip=5.0, out_clip=2.0), target)
    torch.nn.init.constant_(m.policy.langevin[-1].bias, 1.0)
    assert torch.allclose(m.drift(t, x)[0], score.clamp(-2, 2))


@pytest.mark.parametrize("name,method", [("gmm25_tb", "tb_expl"), ("gmm25_tb_ls", "tb_expl_ls"),
                                         ("funnel_dds", "dds_cos"), ("manywell_pis", "pis")])
def test_shipped_configs_are_the_benchmark_runs(name, method, tmp_path):
    """configs/<target>_<method>.toml trains exactly what bench/density.py --full runs for that row (the README's
    published-budget numbers): the same sampler, optimizer, batch and step count."""
    import dataclasses

    from bench import density as bench
    from trainer.config import load_config
    target = name.split("_")[0]
    ours = load_config(REPO / "configs" / f"{name}.toml")
    theirs = load_config(bench.CONFIG, overrides=bench.settings(target, method, bench.FULL, tmp_path))
    for section in ("model", "optim", "data"):
        assert dataclasses.asdict(getattr(ours, section)) == dataclasses.asdict(getattr(theirs, section)), section
    assert ours.train.max_steps == theirs.train.max_steps and ours.run.seed == theirs.run.seed


def test_bench_combines_seeds_and_refuses_mixed_runs(tmp_path):
    """bench/density.py --combine: mean and sample std over seeds beside the published mean and spread; a folder
    of another budget, an ablation or a repeated seed is refused, naming the file."""
    from bench import density as bench

    def write(name, seed, err, budget=bench.FULL, sets=()):
        d = tmp_path / name
        d.mkdir()
        row = {"target": "manywell", "method": "pis", "log_z_error": err, "iw_log_z_error": err / 2,
               "published": 3.85, "best_published": 3.85}
        (d / "density_bench.json").write_text(json.dumps({"budget": budget, "seed": seed, "sets": list(sets),
                                                          "rows": [row]}))
        return d
    a, b = write("s0", 0, 3.80), write("s1", None, 3.90, sets=["run.seed=1"])   # an early run's form of --seed
    [r] = bench.combine([a, b], tmp_path / "out")
    assert r["seeds"] == [0, 1] and r["mean"] == pytest.approx(3.85) and r["std"] == pytest.approx(0.1 / 2 ** 0.5)
    assert r["inside_published_spread"] and not r["every_seed_below_best"]
    assert json.loads((tmp_path / "out" / "density_seeds.json").read_text())["rows"][0]["mean"] == r["mean"]
    for bad, says in ((write("abl", 2, 3.7, sets=["optim.lr=1e-2"]), "abl/density_bench.json is an ablation"),
                      (write("short", 3, 3.7, budget=bench.REDUCED), "short/density_bench.json has budget"),
                      (write("again", 0, 3.7), "seed \\[0, 0, 1\\] more than once")):
        with pytest.raises(ValueError, match=says):
            bench.combine([a, b, bad], tmp_path / "out")

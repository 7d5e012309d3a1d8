"""DeepSpeed ZeRO-1/2/3 (trainer/parallel/deepspeed.py) on real gloo ranks, through the Trainer: parity with DDP,
every compressor a stage carries, exact resume, a non-finite gradient on one rank, bad input, the JIT-lock hazard,
and the `deepspeed` / `mpirun` launchers. The adapter's hold on DeepSpeed's internals: test_deepspeed_adapter.py.

The problem is test_comm.py's: Darcy at 17x17, a small FNO with COMPLEX spectral weights, Adam. The multi-rank runs
share a few launches (module fixtures); each test checks its part.

Tolerances. fp32 ZeRO at 2 ranks is DDP's arithmetic: the exchange sums a + b (commutative) and divides by 2, and
the optimizer steps the same elements on flat partitions. With real spectral weights (`model.fno.spectral_weights
= "real"`) losses and parameters are bit-identical. With complex ones the engine stores them as real (..., 2)
tensors (ZeRO holds one dtype per group), and torch's Adam adds weight decay to a complex64 gradient in complex
arithmetic (g + wd * p with wd promoted to complex: the product and the sum round separately), so DDP's parameters
differ from ZeRO's by an ulp from step 1: measured 1e-8 after one step and 4e-7..9e-7 after 4..20 steps, losses
agreeing to ~1e-7 relative. There: losses to 1e-6 relative, parameters to 1e-5 absolute.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SMALL_MODEL, fieldtrain
from test_comm import COMPRESSORS as DDP_COMPRESSORS
from test_comm import assert_consistent, run_losses
from test_comm import engine_parity as assert_parity

CONFIG = str(REPO / "configs" / "darcy_fno.toml")
WORKER = str(REPO / "tests" / "comm_worker.py")
DDP = ["parallel.engine=ddp"]
STEPS = 24                                 # test_comm.py's, which its margins are for
MARGINS = {"bf16": 0.05}                   # compressors without a row in test_comm.py (as test_fsdp2.py)
STAGE2 = ("none", "powersgd", "int8")      # ZeRO-2 runs ZeRO-1's exchange code on the same buckets: a sample


def zero(stage: int) -> list[str]:
    return ["parallel.engine=deepspeed", f"parallel.zero_stage={stage}"]


def _steps(n: int) -> list[str]:
    return [f"train.max_steps={n}"]


def compressor_rows(stage: int) -> list[tuple[str, list[str], float]]:
    """test_comm.py's rows (plus MARGINS) for the compressors ZeRO-`stage` carries; `auto`/`skip` are tested apart."""
    from trainer.parallel.deepspeed import DeepSpeedEngine
    allowed = DeepSpeedEngine.allowed(stage)
    rows = [(n, o, m) for n, o, m in DDP_COMPRESSORS if o[0].split("=", 1)[1] in allowed]
    rows += [(n, [f"comm.compressor={n}"], m) for n, m in MARGINS.items() if n in allowed]
    missing = set(allowed) - {o[0].split("=", 1)[1] for _, o, _ in rows} - {"auto", "skip"}
    assert not missing, f"compressors ZeRO-{stage} carries without a margin here: {missing}"
    return rows


# ---- launching ranks --------------------------------------------------------------------------------------------
def launch(world: int, spec: dict, out: Path, launcher: str = "torchrun", worker: str = WORKER, env: dict = None,
           ok: bool = True) -> tuple[dict, subprocess.CompletedProcess]:
    """`world` ranks of `worker` under torchrun, DeepSpeed's launcher or mpirun; each run's summary (+ params)."""
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    from launch.local import free_port
    port = str(free_port())
    if launcher == "mpirun":
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(world), sys.executable, worker]
    elif launcher == "deepspeed":   # CPU: --num_gpus is the process count; the worker takes no --local_rank
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(world), "--no_local_rank",
               "--master_addr", "127.0.0.1", "--master_port", port, worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
               f"--master-port={port}", worker]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **(env or {})}
    r = subprocess.run([*cmd, str(spec_path), str(out)], cwd=REPO, env=full_env, capture_output=True, text=True,
                       timeout=900)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    results = {}
    for run in spec["runs"]:
        path = out / f"{run['name']}.json"
        if path.exists():
            results[run["name"]] = json.loads(path.read_text())
            if spec.get("save_params", True):
                results[run["name"]]["params"] = [torch.load(out / f"{run['name']}.rank{k}.pt") for k in range(world)]
    return results, r


def losses(runs_dir: Path, name: str) -> list[float]:
    return run_losses(runs_dir / name)


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def stale_lock_dir(ds_dir) -> Path:
    """A torch-extensions cache holding the lock a compile killed midway leaves (every later build of that op
    waits on it forever)."""
    d = ds_dir / "torch_extensions"
    (d / "deepspeed_shm_comm").mkdir(parents=True)
    (d / "deepspeed_shm_comm" / "lock").touch()
    return d


def _spec(small_darcy, runs_dir: Path, runs: list[dict], **extra) -> dict:
    base = [f"data.path={small_darcy}", f"run.out_dir={runs_dir}", "train.ckpt_every=0", *SMALL_MODEL]
    return {"config": CONFIG, "base": base, "runs": runs, **extra}


def _fp16_supported() -> bool:
    from trainer.parallel.deepspeed_import import _import_deepspeed
    return bool(_import_deepspeed().accelerator.get_accelerator().is_fp16_supported())


def test_half_parameters_the_device_cannot_take_are_refused_by_key():
    from trainer.parallel.deepspeed import check_param_dtype
    acc = type("Acc", (), {"is_fp16_supported": lambda self: None, "is_bf16_supported": lambda self: True,
                           "device_name": lambda self: "cpu"})()
    ds = type("DS", (), {"accelerator": type("M", (), {"get_accelerator": staticmethod(lambda: acc)})})
    with pytest.raises(ValueError, match=r"'parallel.param_dtype' = 'float16'.*cpu accelerator.*use 'bfloat16' or "
                                         r"'float32'"):
        check_param_dtype(ds, "float16")
    check_param_dtype(ds, "bfloat16")
    check_param_dtype(ds, "float32")


@pytest.fixture(scope="module")
def two_ranks(small_darcy, ds_dir, stale_lock_dir) -> dict:
    """Everything the 2-rank tests read, in one torchrun, with a stale JIT lock in the extensions cache."""
    runs = []
    for form in ("complex", "real"):   # parity, 20 steps
        w = [] if form == "complex" else ["model.fno.spectral_weights=real"]
        runs.append({"name": f"ddp_{form}", "overrides": DDP + _steps(20) + w})
        runs += [{"name": f"z{s}_{form}", "overrides": zero(s) + _steps(20) + w} for s in (1, 2, 3)]
    for stage in (1, 3):      # gradient clipping (DeepSpeed's, over the partitions); bf16 and fp16 parameters
        runs.append({"name": f"z{stage}_clip", "overrides": zero(stage) + _steps(20) + ["optim.grad_clip=0.05"]})
    runs.append({"name": "ddp_clip", "overrides": DDP + _steps(20) + ["optim.grad_clip=0.05"]})
    runs += [{"name": "z1_bfloat16", "overrides": zero(1) + _steps(20) + ["parallel.param_dtype=bfloat16"]},
             {"name": "z3_bfloat16", "overrides": zero(3) + _steps(20) + ["parallel.param_dtype=bfloat16"]}]
    if _fp16_supported():   # DeepSpeed's CPU accelerator: oneDNN fp16 (AVX512-FP16 / AMX), absent on many CPUs
        runs.append({"name": "z2_float16", "overrides": zero(2) + _steps(20) + ["parallel.param_dtype=float16",
                                                                              "comm.compressor=int8"]})
    for stage in (1, 2, 3):   # every compressor the stage carries, 24 steps
        for name, o, _ in compressor_rows(stage):
            if stage != 2 or name in STAGE2:
                runs.append({"name": f"z{stage}_c_{name}", "overrides": zero(stage) + _steps(STEPS) + o})
    for stage in (1, 3):
        runs.append({"name": f"z{stage}_auto", "overrides": zero(stage) + _steps(4) + [
            "comm.compressor=auto", 'comm.auto_candidates=["none", "fp16", "int8", "sign"]']})
    for stage, c in ((1, "powersgd"), (2, "topk"), (3, "int8")):   # resume N/2 + N/2, compressor state included
        o = zero(stage) + _steps(14) + [f"comm.compressor={c}"]
        runs += [{"name": f"z{stage}_straight", "overrides": o},
                 {"name": f"z{stage}_staged", "overrides": o, "stop_after": 7},
                 {"name": f"z{stage}_staged", "overrides": o, "resume": True}]
    for stage, c in ((1, "int8"), (2, "sign"), (3, "int8")):   # a NaN on rank 1 at step 5
        runs.append({"name": f"z{stage}_nan", "overrides": zero(stage) + _steps(10) + [f"comm.compressor={c}"],
                     "poison_step": 5})
    for stage in (1, 3):   # first halves, resumed by one rank in test_zero3_resumes_on_another_world_size...
        runs.append({"name": f"z{stage}_elastic", "overrides": zero(stage) + _steps(14) + ["comm.compressor=int8"],
                     "stop_after": 7})
    runs_dir = ds_dir / "runs"
    results, _ = launch(2, _spec(small_darcy, runs_dir, runs), ds_dir / "two",
                        env={"TORCH_EXTENSIONS_DIR": str(stale_lock_dir)})
    results["runs_dir"] = runs_dir
    return results


# ---- no processes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sets, says", [
    (zero(1)[:1] + ["parallel.zero_stage=4"], "'parallel.zero_stage' = 4; allowed: 1, 2, 3"),
    (zero(3) + ["comm.compressor=powersgd"], "'comm.compressor' = 'powersgd' cannot run under parallel.engine = "
                                             "'deepspeed' with parallel.zero_stage = 3; allowed there: 'none', "),
    (zero(1) + ["comm.compressor=torch_fp16"], "'comm.compressor' = 'torch_fp16' cannot run under parallel.engine "
                                               "= 'deepspeed' with parallel.zero_stage = 1 (torch's DDP"),
    (zero(2) + ["comm.compressor=torch_powersgd"], "'comm.compressor' = 'torch_powersgd' cannot run under"),
    (zero(3) + ["comm.compressor=torch_powersgd"], "'comm.compressor' = 'torch_powersgd' cannot run under"),
    (zero(3) + ["comm.compressor=auto", 'comm.auto_candidates=["powersgd"]'],
     "'comm.auto_candidates' = ['powersgd']: none can run under"),
    (zero(3) + ["comm.compressor=topk", "comm.ef_state=sharded"], "'comm.ef_state' = 'sharded'"),
    (zero(2) + ["parallel.reduce_dtype=bfloat16"], "'parallel.reduce_dtype' = 'bfloat16' cannot run under"),
])
def test_what_a_stage_cannot_carry_is_refused_at_config_load(sets, says):
    import torch.distributed as dist

    from trainer.config import load_config
    with pytest.raises(ValueError) as e:
        load_config(CONFIG, sets)
    assert says in str(e.value), str(e.value)
    assert not dist.is_initialized()


def test_stages_accept_their_compressors_and_config_load_does_not_import_deepspeed():
    code = ("import sys; from trainer.config import load_config; from trainer.parallel.deepspeed import "
            "DeepSpeedEngine as E\n"
            "for s in (1, 2, 3):\n"
            "    for c in E.allowed(s):\n"
            "        load_config(%r, ['parallel.engine=deepspeed', f'parallel.zero_stage={s}',\n"
            "                         f'comm.compressor={c}', 'comm.auto_candidates=[\"none\", \"int8\"]'])\n"
            "assert 'deepspeed' not in sys.modules, 'config load imported deepspeed'\n"
            "print(sorted(E.allowed(1)), sorted(E.allowed(3)))" % CONFIG)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    from trainer.compress import COMPRESSORS
    from trainer.parallel.deepspeed import DeepSpeedEngine
    assert set(DeepSpeedEngine.allowed(1)) == set(DeepSpeedEngine.allowed(2)) == \
        {n for n in COMPRESSORS if not n.startswith("torch_")}
    assert set(DeepSpeedEngine.allowed(3)) == {"none", "fp16", "bf16", "int8", "int4", "sign", "topk", "randk",
                                               "auto", "skip"}


def test_the_cli_refuses_a_compressor_zero3_cannot_carry_before_starting_ranks(tmp_path):
    out = tmp_path / "runs"
    r = fieldtrain("train", CONFIG, "--nproc", "2", *[a for s in zero(3) + ["comm.compressor=powersgd",
                                                                             f"run.out_dir={out}"]
                                                      for a in ("--set", s)])
    assert r.returncode == 2, r.stderr
    assert "'comm.compressor' = 'powersgd'" in r.stderr and "allowed there" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_complex_weights_stored_as_real_give_the_same_outputs_gradients_and_names():
    from trainer.models.fno import FNO
    from trainer.parallel.deepspeed import ViewAsComplex, _ParamNames, store_complex_as_real

    torch.manual_seed(0)
    ref = FNO(1, 1, (4, 4), width=8, n_layers=2, projection_channels=16)
    model = FNO(1, 1, (4, 4), width=8, n_layers=2, projection_channels=16)
    model.load_state_dict(ref.state_dict())
    names = _ParamNames(model)
    assert store_complex_as_real(model) == ["blocks.0.spectral.weight", "blocks.1.spectral.weight"]
    names.bind(model)
    assert not any(p.is_complex() for p in model.parameters())
    assert "blocks.0.spectral.parametrizations.weight.original" in dict(model.named_parameters())
    x = torch.randn(3, 1, 9, 9)
    y_ref, y = ref(x), model(x)
    assert torch.equal(y_ref, y)
    y_ref.square().mean().backward()
    y.square().mean().backward()
    for name, p in ref.named_parameters():
        q = names.by_name[name]
        assert torch.equal(torch.view_as_real(p.grad) if p.is_complex() else p.grad, q.grad), name
        assert torch.equal(names.original_form(name, q.detach()), p.detach()), name
    # inside a ZeRO flat buffer the storage may start at an odd float: the same values, without a complex view
    w = torch.view_as_real(ref.blocks[0].spectral.weight.detach())
    buf = torch.zeros(w.numel() + 1)
    odd = buf[1:].view_as(w)
    odd.copy_(w)
    assert torch.equal(ViewAsComplex()(odd), ref.blocks[0].spectral.weight.detach())


def test_a_deepspeed_outside_the_pinned_range_is_refused(monkeypatch):
    import trainer.parallel.deepspeed_import as adapter
    from importlib import metadata
    lo, hi = adapter._SUPPORTED_RANGE
    assert lo <= adapter._version_tuple(metadata.version("deepspeed")) < hi, \
        f"installed deepspeed {metadata.version('deepspeed')} is outside {adapter.SUPPORTED_DEEPSPEED}"
    monkeypatch.setattr(adapter, "_ds_version", lambda: "0.20.1")
    with pytest.raises(RuntimeError, match=r"supports deepspeed>=0\.19\.8,<0\.20; installed: 0\.20\.1"):
        adapter._import_deepspeed()


def test_a_jit_build_is_refused_with_the_stale_lock_named(tmp_path, monkeypatch):
    """What a DeepSpeed op build meets inside the engine's initialisation: no compile, a message naming the lock."""
    import trainer.parallel.deepspeed_import as adapter
    (tmp_path / "deepspeed_shm_comm").mkdir()
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    ds = adapter._import_deepspeed()
    ds_comm_torch = adapter._ds_comm_torch()
    from deepspeed.ops.op_builder.builder import OpBuilder
    original = OpBuilder.jit_load
    with adapter._no_jit(ds):
        assert ds_comm_torch.build_shm_op() is None      # the shm allreduce op is skipped, not built
        builder = ds.ops.op_builder.CPUAdamBuilder()
        with pytest.raises(RuntimeError) as e:
            builder.jit_load()
    assert OpBuilder.jit_load is original and ds_comm_torch.build_shm_op is not None
    message = str(e.value)
    assert "cpu_adam" in message and str(tmp_path) in message and f"rm {lock}" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deepspeed_shm_comm"]   # nothing was built


# ---- 2 ranks ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fp32_zero_matches_ddp(two_ranks):
    runs_dir = two_ranks["runs_dir"]
    for stage in (1, 2, 3):
        for form in ("complex", "real"):
            r = two_ranks[f"z{stage}_{form}"]
            assert_consistent(r, f"z{stage}_{form}")
            assert r["engine"] == "deepspeed" and r["compressor"] == "none" and r["skipped_steps"] == 0
        assert_parity(two_ranks, runs_dir, "ddp_real", f"z{stage}_real", exact=True)
        assert_parity(two_ranks, runs_dir, "ddp_complex", f"z{stage}_complex", exact=False)
    # ZeRO-1/2 allreduce like DDP; ZeRO-3 reduce-scatters: (W-1)/W of the fp32 bytes, half of an allreduce
    ddp_bytes = two_ranks["ddp_complex"]["grad_bytes_per_step"]
    assert two_ranks["z1_complex"]["grad_bytes_per_step"] == two_ranks["z2_complex"]["grad_bytes_per_step"] == ddp_bytes
    assert 0.45 * ddp_bytes <= two_ranks["z3_complex"]["grad_bytes_per_step"] <= 0.55 * ddp_bytes   # + chunk padding


@pytest.mark.slow
def test_grad_clipping_matches_ddp_to_rounding(two_ranks):
    """DeepSpeed clips with grad / ((norm + 1e-6) / max_norm), torch with grad * (max_norm / (norm + 1e-6)), the
    norm summed over partitions: the same clip, rounded differently."""
    for stage in (1, 3):
        assert_parity(two_ranks, two_ranks["runs_dir"], "ddp_clip", f"z{stage}_clip", exact=False)
        assert two_ranks[f"z{stage}_clip"]["test_rel_l2"] != two_ranks[f"z{stage}_complex"]["test_rel_l2"]   # active


@pytest.mark.slow
def test_bf16_and_fp16_parameters_train(two_ranks):
    """DeepSpeed holds the parameters in bf16/fp16 (fp32 master partitions); forward runs under autocast, the complex
    spectral weights computed in fp32 from their (..., 2) storage. 8 (bf16) or 11 (fp16) significant bits: within
    5% of fp32's test error after 20 steps (measured 0.1-2%)."""
    for name, reference in (("z1_bfloat16", "z1_complex"), ("z2_float16", "z1_complex"),
                            ("z3_bfloat16", "z3_complex")):
        if name not in two_ranks:   # fp16 where DeepSpeed's accelerator has none (the fixture leaves it out)
            continue
        r = two_ranks[name]
        assert_consistent(r, name)
        assert r["skipped_steps"] == 0 and r["steps"] == 20, name
        lb = losses(two_ranks["runs_dir"], name)
        assert lb[-1] < 0.5 * lb[0], (name, lb)
        assert abs(r["test_rel_l2"] / two_ranks[reference]["test_rel_l2"] - 1) <= 0.05, (name, r["test_rel_l2"])


@pytest.mark.slow
def test_every_compressor_a_stage_carries_keeps_ranks_consistent_and_trains(two_ranks):
    for stage in (1, 2, 3):
        fp32 = two_ranks[f"z{stage}_c_none"]
        for name, _, margin in compressor_rows(stage):
            if stage == 2 and name not in STAGE2:
                continue
            r = two_ranks[f"z{stage}_c_{name}"]
            assert r["compressor"] == name.split("_")[0] and r["engine"] == "deepspeed", name
            assert_consistent(r, f"z{stage}_c_{name}")
            assert r["test_rel_l2"] <= fp32["test_rel_l2"] * (1 + margin), (stage, name, r["test_rel_l2"],
                                                                            fp32["test_rel_l2"])
            assert r["skipped_steps"] == 0 and r["state_finite"], (stage, name)
            if name != "none":
                assert r["grad_bytes_per_step"] < fp32["grad_bytes_per_step"], (stage, name)
        auto = two_ranks.get(f"z{stage}_auto")
        if auto is not None:
            assert auto["compressor"] in ("none", "fp16", "int8", "sign"), auto["compressor"]
            assert_consistent(auto, f"z{stage}_auto")


@pytest.mark.slow
def test_resume_half_and_half_is_bit_identical_per_stage_with_compressor_state(two_ranks):
    for stage in (1, 2, 3):
        a, b = two_ranks[f"z{stage}_straight"], two_ranks[f"z{stage}_staged"]
        assert b["steps"] == 14 and b["finished"] and a["state_keys"] == b["state_keys"] > 0, stage
        assert torch.equal(a["params"][0], b["params"][0]), (stage, (a["params"][0] - b["params"][0]).abs().max())
        assert_consistent(b, f"z{stage}_staged")
        assert losses(two_ranks["runs_dir"], f"z{stage}_straight") == losses(two_ranks["runs_dir"], f"z{stage}_staged")


def saved_counters(checkpoint: Path) -> dict:
    """DeepSpeed's counters and the optimizer's step count, as the engine checkpointed them."""
    import torch.distributed.checkpoint as dcp
    holder = {"model_optim": {"engine": {"global_steps": 0, "skipped_steps": 0, "global_samples": 0},
                              "step": torch.tensor(0.0)}}
    dcp.load(holder, checkpoint_id=checkpoint, no_dist=True)
    return {**holder["model_optim"]["engine"], "optimizer_step": holder["model_optim"]["step"].item()}


@pytest.mark.slow
def test_non_finite_gradient_on_one_rank_skips_the_step_everywhere(two_ranks):
    for stage in (1, 2, 3):
        r = two_ranks[f"z{stage}_nan"]
        assert r["skipped_steps"] == 1 and r["steps"] == 10, stage
        assert r["state_finite"] and r["state_keys"] > 0, stage
        assert torch.isfinite(r["params"][0]).all(), stage
        assert_consistent(r, f"z{stage}_nan")
        # DeepSpeed counted the skip as its own overflow skip: 10 steps, 1 skipped, 9 optimizer updates
        counters = saved_counters(two_ranks["runs_dir"] / f"z{stage}_nan" / "checkpoints" / "step_00000010")
        assert counters["global_steps"] == 10 and counters["skipped_steps"] == 1, (stage, counters)
        assert counters["optimizer_step"] == 9, (stage, counters)


@pytest.mark.slow
def test_a_stale_jit_lock_neither_hangs_nor_builds_and_is_reported(two_ranks, stale_lock_dir):
    """Every run above started with the lock in its TORCH_EXTENSIONS_DIR (the fixture's subprocess timeout bounds a
    hang); none compiled anything, and each warned with the fix."""
    assert sorted(p.name for p in stale_lock_dir.iterdir()) == ["deepspeed_shm_comm"]
    assert [p.name for p in (stale_lock_dir / "deepspeed_shm_comm").iterdir()] == ["lock"]
    r = two_ranks["z1_complex"]
    assert any("stale torch-extension build locks" in w and f"rm {stale_lock_dir}/deepspeed_shm_comm/lock" in w
               for w in r["warnings"]), r["warnings"]


# ---- 4 ranks ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_four_ranks_match_ddp_to_rounding(small_darcy, ds_dir):
    """At 4 ranks gloo sums the 4 gradients in a different order for a flat ZeRO partition than for DDP's bucket, so
    the comparison is engine_parity's 1e-6 relative (real spectral weights, to keep complex Adam's ulp out of it)."""
    real = _steps(20) + ["model.fno.spectral_weights=real"]
    runs = [{"name": "ddp4", "overrides": DDP + real}] + [{"name": f"z{s}_4", "overrides": zero(s) + real}
                                                          for s in (1, 2, 3)]
    runs_dir = ds_dir / "runs4"
    results, _ = launch(4, _spec(small_darcy, runs_dir, runs), ds_dir / "four")
    for stage in (1, 2, 3):
        r = results[f"z{stage}_4"]
        assert_consistent(r, f"z{stage}_4")
        assert r["world_size"] == 4 and r["skipped_steps"] == 0
        assert_parity(results, runs_dir, "ddp4", f"z{stage}_4", exact=False)


# ---- one rank: a ZeRO-3 checkpoint re-partitions, a ZeRO-1 one is refused ------------------------------------------
@pytest.mark.slow
def test_zero3_resumes_on_another_world_size_and_zero1_says_why_it_cannot(small_darcy, two_ranks, ds_dir):
    runs = [{"name": "z3_elastic", "overrides": zero(3) + _steps(14) + ["comm.compressor=int8"], "resume": True},
            {"name": "z1_elastic", "overrides": zero(1) + _steps(14) + ["comm.compressor=int8"], "resume": True}]
    results, r = launch(1, _spec(small_darcy, two_ranks["runs_dir"], runs), ds_dir / "one", ok=False)
    z3 = results["z3_elastic"]
    assert z3["steps"] == 14 and z3["finished"] and z3["world_size"] == 1 and z3["skipped_steps"] == 0
    assert any("2 -> 1" in w and "error-feedback state reset" in w for w in z3["warnings"]), z3["warnings"]
    assert r.returncode != 0 and "z1_elastic" not in results
    assert ("checkpoint written by 2 ranks under ZeRO-1, this run has 1: ZeRO-1/2 checkpoints hold each rank's "
            "optimizer partition and are not re-partitioned; resume with 2 ranks") in r.stderr, r.stderr[-3000:]


# ---- launchers --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_deepspeed_launcher_runs_the_engine_as_torchrun_does(small_darcy, two_ranks, ds_dir, stale_lock_dir):
    runs = [{"name": "z2_deepspeed_launcher", "overrides": zero(2) + _steps(20)}]
    results, _ = launch(2, _spec(small_darcy, ds_dir / "launcher_runs", runs), ds_dir / "ds_launcher",
                        launcher="deepspeed", env={"TORCH_EXTENSIONS_DIR": str(stale_lock_dir)})
    r = results["z2_deepspeed_launcher"]
    assert r["world_size"] == 2 and r["steps"] == 20
    assert torch.equal(r["params"][0], two_ranks["z2_complex"]["params"][0])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun is installed by `make test`")
def test_mpirun_with_the_mpi_transport_gives_the_gloo_result(small_darcy, two_ranks, ds_dir):
    runs = [{"name": f"z{s}_mpi", "overrides": zero(s) + _steps(STEPS) + ["comm.compressor=int8",
                                                                         "comm.transport=mpi"]} for s in (1, 3)]
    results, _ = launch(2, _spec(small_darcy, ds_dir / "mpi_runs", runs), ds_dir / "mpi", launcher="mpirun")
    for s in (1, 3):
        r = results[f"z{s}_mpi"]
        assert_consistent(r, f"z{s}_mpi")
        assert torch.equal(r["params"][0], two_ranks[f"z{s}_c_int8"]["params"][0]), s

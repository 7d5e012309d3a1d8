"""The adapter's hold on DeepSpeed's internals (trainer/parallel/deepspeed.py): with the internals it patches moved
or renamed, every rank fails loudly naming them; with them in place, the wire bytes counted below DeepSpeed show the
compressor ran inside ZeRO-1/2/3. Launched as test_deepspeed.py launches its ranks."""

import json
from pathlib import Path

import pytest

from conftest import REPO
from test_deepspeed import _spec, _steps, launch, zero


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deepspeed_adapter")


ADAPTER_WORKER = r'''
"""Runs one scenario at a time with DeepSpeed's internals moved (or not), records what each rank saw."""
import json, sys
from pathlib import Path
sys.path.insert(0, REPO)
import torch
import torch.distributed as dist
from launch.rendezvous import init_distributed
from trainer.config import load_config
from trainer.train import Trainer

# wire bytes of every torch.distributed collective while an engine's backward runs, by the usual algorithms
COUNT = {"on": False, "reduce": 0, "gather": 0}

def counted(fn, kind, arg, factor):
    def wrapper(*args, **kwargs):
        if COUNT["on"]:
            t = kwargs.get(arg[1]) if arg[1] in kwargs else args[arg[0]]
            W = dist.get_world_size()
            COUNT[kind] += int(factor(W) * t.numel() * t.element_size())
        return fn(*args, **kwargs)
    return wrapper

for name, kind, arg, factor in [
        ("all_reduce", "reduce", (0, "tensor"), lambda W: 2 * (W - 1) / W),
        ("reduce", "reduce", (0, "tensor"), lambda W: (W - 1) / W),
        ("reduce_scatter_single", "reduce", (1, "input"), lambda W: (W - 1) / W),
        ("reduce_scatter_tensor", "reduce", (1, "input"), lambda W: (W - 1) / W),
        ("_reduce_scatter_base", "reduce", (1, "input"), lambda W: (W - 1) / W),
        ("all_to_all_single", "reduce", (1, "input"), lambda W: (W - 1) / W),
        ("all_gather", "gather", (1, "tensor"), lambda W: W - 1),
        ("all_gather_into_tensor", "gather", (1, "input_tensor"), lambda W: W - 1),
        ("_all_gather_base", "gather", (1, "input_tensor"), lambda W: W - 1),
        ("broadcast", "gather", (0, "tensor"), lambda W: 1)]:
    setattr(dist, name, counted(getattr(dist, name), kind, arg, factor))

def sabotage(kind):
    """Monkeypatch DeepSpeed as an upgrade that moved the adapter's internals might; returns the undo."""
    import deepspeed.runtime.zero.stage3 as stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Z12
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Z3
    if kind == "average_tensor_renamed":
        old = Z12.average_tensor
        Z12._average_tensor_v2 = old
        del Z12.average_tensor
        return lambda: (setattr(Z12, "average_tensor", old), delattr(Z12, "_average_tensor_v2"))
    if kind == "reduce_scatter_moved":
        old = stage3.reduce_scatter_coalesced
        del stage3.reduce_scatter_coalesced
        return lambda: setattr(stage3, "reduce_scatter_coalesced", old)
    if kind == "buckets_via_allreduce_bucket":   # ZeRO-1/2 reduce the non-contiguous way: allreduce_bucket in fp32
        old = Z12.reduce_ipg_grads
        def reduce_ipg_grads(self, comm_dtype=None):
            self.contiguous_gradients = False
            return old(self, comm_dtype)
        Z12.reduce_ipg_grads = reduce_ipg_grads
        return lambda: setattr(Z12, "reduce_ipg_grads", old)
    if kind == "zero3_plain_allreduce":          # ZeRO-3 averages a bucket with its own fp32 all_reduce
        name = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"
        old = getattr(Z3, name)
        def avg_scatter(self, params, communication_data_type):
            W, r = dist.get_world_size(), dist.get_rank()
            out = []
            for p in params:
                g = p.grad.reshape(-1).clone()
                dist.all_reduce(g)
                g.div_(W)
                c = -(-g.numel() // W)
                out.append(g[r * c:(r + 1) * c])
            return out
        setattr(Z3, name, avg_scatter)
        return lambda: setattr(Z3, name, old)
    return lambda: None

def main(spec_path, out):
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    env = None
    seen = {}
    for run in spec["runs"]:
        cfg = load_config(spec["config"], spec["base"] + run["overrides"] + [f"run.name={run['name']}"])
        if env is None:
            env, device = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
        undo = sabotage(run.get("sabotage"))
        COUNT.update(reduce=0, gather=0)
        try:
            trainer = Trainer(cfg, device)
            backward = trainer.engine.backward
            def counted_backward(loss):
                COUNT["on"] = True
                try:
                    backward(loss)
                finally:
                    COUNT["on"] = False
            trainer.engine.backward = counted_backward
            summary = trainer.train()
            seen[run["name"]] = {"error": None, "steps": summary["steps"], "reduce_bytes": COUNT["reduce"],
                                 "gather_bytes": COUNT["gather"], "grad_bytes_per_step": summary["grad_bytes_per_step"]}
        except Exception as e:
            seen[run["name"]] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            undo()
        dist.barrier()
    (Path(out) / f"adapter.rank{env.rank}.json").write_text(json.dumps(seen))
    from launch.rendezvous import destroy_distributed
    destroy_distributed()

main(sys.argv[1], sys.argv[2])
'''


@pytest.fixture(scope="module")
def adapter_runs(small_darcy, ds_dir) -> list[dict]:
    runs = [{"name": "gone_average_tensor", "overrides": zero(2) + ["comm.compressor=int8"],
             "sabotage": "average_tensor_renamed"},
            {"name": "gone_reduce_scatter", "overrides": zero(3) + ["comm.compressor=int8"],
             "sabotage": "reduce_scatter_moved"},
            {"name": "fp32_route_zero1", "overrides": zero(1) + ["comm.compressor=int8"],
             "sabotage": "buckets_via_allreduce_bucket"},
            {"name": "fp32_route_zero3", "overrides": zero(3) + ["comm.compressor=int8"],
             "sabotage": "zero3_plain_allreduce"}]
    runs += [{"name": f"z{s}_{c}_bytes", "overrides": zero(s) + [f"comm.compressor={c}"]}
             for s in (1, 2, 3) for c in ("none", "int8")]
    for run in runs:
        run["overrides"] = run["overrides"] + _steps(2)
    worker = ds_dir / "adapter_worker.py"
    worker.write_text(ADAPTER_WORKER.replace("sys.path.insert(0, REPO)", f"sys.path.insert(0, {str(REPO)!r})"))
    out = ds_dir / "adapter"
    launch(2, _spec(small_darcy, ds_dir / "adapter_runs", runs, save_params=False), out, worker=str(worker))
    return [json.loads((out / f"adapter.rank{k}.json").read_text()) for k in range(2)]


@pytest.mark.slow
def test_moved_deepspeed_internals_fail_loudly_on_every_rank(adapter_runs):
    expected = {
        "gone_average_tensor": "DeepSpeedZeroOptimizer lacks average_tensor, which fieldtrain's adapter",
        "gone_reduce_scatter": "lacks deepspeed.runtime.zero.stage3.reduce_scatter_coalesced, which fieldtrain's",
        "fp32_route_zero1": "reduced gradients through allreduce_bucket, which bypasses fieldtrain's compressed",
        "fp32_route_zero3": "gradient elements outside fieldtrain's exchange (ZeRO-3, comm.compressor = 'int8')",
    }
    for rank_seen in adapter_runs:
        for name, says in expected.items():
            error = rank_seen[name]["error"]
            assert error is not None and says in error, (name, error)
            assert "supports deepspeed>=0.19.8,<0.20" in error, (name, error)


@pytest.mark.slow
def test_wire_bytes_prove_the_compressor_ran_inside_zero(adapter_runs):
    """Bytes of every torch.distributed collective issued during backward, counted below DeepSpeed and below our
    transport: int8 (1 byte + a 4-byte scale per 256) puts about a quarter of fp32's bytes on the wire. ZeRO-3's
    backward also gathers parameters (fp32 by design), counted apart."""
    for rank_seen in adapter_runs:
        for stage in (1, 2, 3):
            fp32, int8 = rank_seen[f"z{stage}_none_bytes"], rank_seen[f"z{stage}_int8_bytes"]
            assert fp32["error"] is None and int8["error"] is None, (fp32, int8)
            # ZeRO-1/2's int8 exchange all-to-alls codes and allgathers the averaged shards; ZeRO-3's reduce-scatter
            # form only all-to-alls, and its backward's allgathers are DeepSpeed's parameter gathers
            wire = (lambda r: r["reduce_bytes"]) if stage == 3 else (lambda r: r["reduce_bytes"] + r["gather_bytes"])
            ratio = wire(int8) / wire(fp32)
            assert 0.2 < ratio < 0.3, (stage, ratio, fp32, int8)
            # what the exchange counts itself agrees with what crossed torch.distributed (2 steps)
            assert fp32["reduce_bytes"] == 2 * fp32["grad_bytes_per_step"], (stage, fp32)
            if stage != 3:
                assert fp32["gather_bytes"] == 0, (stage, fp32)

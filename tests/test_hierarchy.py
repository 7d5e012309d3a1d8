"""comm.hierarchy = "node" (trainer/compress/hierarchy.py): node layouts from the launcher, the config's refusals, and
2 nodes x 2 ranks launched as two torchrun "nodes" on loopback: fp32 inside a node, compressed between nodes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL_MODEL
from trainer.compress.hierarchy import node_layout
from trainer.config import load_config

WORKER = str(REPO / "tests" / "comm_worker.py")


def test_node_layout_from_local_ranks():
    assert node_layout([(0, 2), (1, 2), (0, 2), (1, 2)]) == [[0, 1], [2, 3]]
    assert node_layout([(0, 1)] * 3) == [[0], [1], [2]]
    assert node_layout([(r, 4) for r in range(4)]) == [[0, 1, 2, 3]]


def test_nodes_that_are_not_whole_and_equal_are_refused_by_name():
    with pytest.raises(ValueError, match="whole number of equal nodes.*3 ranks"):
        node_layout([(0, 2), (1, 2), (0, 2)])
    with pytest.raises(ValueError, match="whole number of equal nodes"):
        node_layout([(0, 2), (1, 2), (0, 1)])
    with pytest.raises(ValueError, match=r"ranks 0\.\.1 should be one node.*\[0, 0\].*--map-by slot"):
        node_layout([(0, 2), (0, 2), (1, 2), (1, 2)])       # round-robin placement


@pytest.mark.parametrize("overrides, says", [
    (["comm.hierarchy=rack"], "comm.hierarchy"),
    (["comm.hierarchy=node", "parallel.engine=fsdp2", "comm.compressor=int8"], "built for 'ddp'"),
    (["comm.hierarchy=node", "comm.compressor=torch_powersgd"], "torch's own DDP hook"),
    (["comm.hierarchy=node", "comm.transport=mpi"], "torch.distributed process groups"),
    (["comm.auto_every=100", "comm.compressor=auto", "parallel.engine=fsdp2"], "auto decides once"),
])
def test_hierarchy_config_errors(overrides, says):
    with pytest.raises(ValueError, match=says):
        load_config(None, overrides)


def _two_nodes(spec: dict, out) -> dict:
    """2 torchrun agents, --nnodes 2 x --nproc-per-node 2, on loopback: LOCAL_WORLD_SIZE = 2 on each."""
    from launch.local import free_port
    port = free_port()
    out.mkdir()
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                               "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}", WORKER,
                               str(out / "spec.json"), str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    results = {}
    for run in spec["runs"]:
        r = json.loads((out / f"{run['name']}.json").read_text())
        r["params"] = [torch.load(out / f"{run['name']}.rank{k}.pt") for k in range(4)]
        results[run["name"]] = r
    return results


@pytest.mark.slow
def test_two_nodes_of_two_ranks_stay_identical_and_train_like_the_flat_exchange(small_darcy, tmp_path):
    """Replicas bit-identical on all 4 ranks; each compressor's final error within the margin test_comm.py allows
    the flat exchange over fp32 (fp32 inside a node loses nothing; between nodes the compressor sees 2 node means
    instead of 4 rank gradients); fewer bytes cross between nodes than the flat exchange sends."""
    base = [f"data.path={small_darcy}", f"run.out_dir={tmp_path / 'runs'}", "train.max_steps=24",
            "train.ckpt_every=0", *SMALL_MODEL]
    margins = {"int8": 0.02, "powersgd": 0.25}          # tests/test_comm.py's COMPRESSORS margins, 24 steps
    runs = [{"name": "fp32", "overrides": ["comm.compressor=none"]}]
    for c in margins:
        opts = [f"comm.compressor={c}"] + (["comm.powersgd.rank=2"] if c == "powersgd" else [])
        runs += [{"name": f"flat_{c}", "overrides": opts}, {"name": f"node_{c}", "overrides": opts + ["comm.hierarchy=node"]}]
    # auto between nodes: leaders decide and broadcast the shortlist in their node; its in-training trials switch
    # compressors on all 4 ranks at the same steps (3 steps each, then the fastest)
    runs.append({"name": "node_auto", "overrides": ["comm.compressor=auto", "comm.hierarchy=node", "comm.auto_trial_steps=3",
                                                    'comm.auto_candidates=["int8", "sign", "topk"]']})
    spec = {"config": str(REPO / "configs" / "darcy_fno.toml"), "base": base, "runs": runs}
    results = _two_nodes(spec, tmp_path / "out")
    assert results["node_auto"]["compressor"] in ("int8", "sign", "topk")
    fp32 = results["fp32"]["test_rel_l2"]
    for name, r in results.items():
        assert r["replica_max_abs_diff"] == 0.0, name
        assert all(torch.equal(r["params"][0], p) for p in r["params"][1:]), name
    for c, margin in margins.items():
        node, flat = results[f"node_{c}"], results[f"flat_{c}"]
        assert node["test_rel_l2"] <= fp32 * (1 + margin), (c, node["test_rel_l2"], fp32)
        assert 0 < node["grad_bytes_per_step"] < flat["grad_bytes_per_step"], c   # rank 0, a leader

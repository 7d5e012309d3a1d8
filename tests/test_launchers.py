"""One config under several launchers: `mpirun -n 4 fieldtrain train` follows the trajectory of
`fieldtrain train --nproc 4` (torchrun) exactly, and with the compressors exchanging through mpi4py."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMALL_MODEL
from test_train import CONFIG, final_state, sets


def losses(run_dir) -> list[str]:
    # Compared as written (the CSV's repr of each float), so equal means bit-identical.
    return [row["train_loss"] for row in csv.DictReader((run_dir / "metrics.csv").open()) if row.get("train_loss")]


def launch(*cmd: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun is installed by `make test`")
def test_mpirun_four_ranks_follows_the_torchrun_trajectory(small_darcy, tmp_path):
    common = [f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "train.max_steps=6",
              "comm.compressor=powersgd", *SMALL_MODEL]
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "4", sys.executable, "-m", "launch.cli"]
    launch(sys.executable, "-m", "launch.cli", "train", CONFIG, "--nproc", "4", *sets(*common, "run.name=torchrun"))
    r = launch(*mpirun, "train", CONFIG, *sets(*common, "run.name=mpirun"))
    assert "from Open MPI (mpirun)" in r.stderr
    launch(*mpirun, "train", CONFIG, *sets(*common, "run.name=mpi4py", "comm.transport=mpi"))

    # The launcher changes nothing: same ranks, same gloo collectives, bit-identical losses and weights.
    a, b = losses(tmp_path / "torchrun"), losses(tmp_path / "mpirun")
    assert len(a) == 6 and a == b, (a, b)
    sa, sb = final_state(tmp_path / "torchrun"), final_state(tmp_path / "mpirun")
    for key, value in sa["model_optim"]["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb["model_optim"]["model"][key]), key
    # Through mpi4py the allreduce sums 4 ranks in another order than gloo's ring: equal to rounding.
    c = losses(tmp_path / "mpi4py")
    assert len(c) == 6 and c[0] == a[0]
    assert [float(v) for v in c] == pytest.approx([float(v) for v in a], rel=1e-5)
    assert json.loads((tmp_path / "mpi4py" / "summary.json").read_text())["replica_max_abs_diff"] == 0.0


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_left_alone_gives_up_after_the_rendezvous_timeout(small_darcy, tmp_path, rank):
    """WORLD_SIZE=2 but only one rank starts: it stops after dist.timeout_s with a message, not a hang."""
    from launch.local import free_port
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    r = subprocess.run([sys.executable, "-m", "launch.cli", "train", CONFIG,
                        *sets(f"data.path={small_darcy}", f"run.out_dir={tmp_path}", "dist.timeout_s=3", *SMALL_MODEL)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"rank {rank}/2 (torchrun): rendezvous at 127.0.0.1:" in r.stderr
    assert "did not complete within dist.timeout_s=3 s" in r.stderr
    assert not list(tmp_path.rglob("checkpoints"))

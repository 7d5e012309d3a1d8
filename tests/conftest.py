import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def small_darcy(tmp_path_factory) -> str:
    """96 Darcy samples at 17x17 in chunks of 16 (5 chunks train, 1 test): enough to see a loss fall."""
    from data.darcy import write_darcy_dataset
    url = str(tmp_path_factory.mktemp("data") / "darcy.zarr")
    write_darcy_dataset(url, n=96, res=17, seed=0, chunk_size=16, fine_factor=2)
    return url


SMALL_MODEL = ["model.fno.width=16", "model.fno.modes=[4, 4]", "model.fno.n_layers=2", "model.fno.projection_channels=32",
               "optim.lr=1e-2",
               "model.fno.padding=0", "data.batch_size=8", "train.progress=false", "train.log_every=1"]


def fieldtrain(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the console entry point as a user would (python -m launch.cli == `fieldtrain`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto's server, as s3fs's own tests use), with one bucket."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    from launch.local import free_port
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    creds = {"key": "fieldtrain-test-key", "secret": "fieldtrain-test-SECRET-do-not-log"}
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs
    fs = s3fs.S3FileSystem(**creds, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir("fieldtrain-test")
    yield {"endpoint": endpoint, "bucket": "fieldtrain-test", **creds,
           "storage_options": {**creds, "client_kwargs": {"endpoint_url": endpoint}}}
    server.stop()


def run_two_ranks(worker, args: tuple, start_method: str, timeout_s: int, hung: str) -> None:
    """worker(rank, port, *args) on 2 local processes joined by gloo on a free port; a rank that hangs fails the
    calling test (`hung` says where) instead of the suite. fork skips re-importing torch (~15 s on two shared cores)
    where the workers use only small tensors; spawn where they need a clean process."""
    import torch.multiprocessing as mp

    from launch.local import free_port
    ctx = mp.start_processes(worker, args=(free_port(), *args), nprocs=2, join=False, start_method=start_method)
    for _ in range(timeout_s):
        if ctx.join(timeout=1):
            return
    for p in ctx.processes:
        p.kill()
    pytest.fail(f"a rank hung {hung}")

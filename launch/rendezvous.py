"""Read the launcher's environment and initialise torch.distributed."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("fieldtrain")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: str


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def env_rank() -> int:
    """This process's rank as the launcher's environment tells it, before any initialisation (for logging)."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _mpi_master() -> tuple[str, str]:
    """Under mpirun without MASTER_ADDR/PORT: rank 0 picks them and broadcasts them over MPI."""
    import socket
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    chosen = None
    if comm.Get_rank() == 0:
        one_host = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == os.environ["OMPI_COMM_WORLD_SIZE"]
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if one_host else socket.gethostname())
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            chosen = (addr, str(os.environ.get("MASTER_PORT") or sock.getsockname()[1]))
    return comm.bcast(chosen, root=0)


def read_dist_env() -> DistEnv:
    """The launcher's variables; explicit torchrun variables (RANK, WORLD_SIZE, ...) win over Open MPI's
    (OMPI_COMM_WORLD_*); none means one rank."""
    if "WORLD_SIZE" not in os.environ and "OMPI_COMM_WORLD_SIZE" in os.environ:
        rank, world = _int_env("OMPI_COMM_WORLD_RANK"), _int_env("OMPI_COMM_WORLD_SIZE")
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = _mpi_master()
        return DistEnv(rank, world, _int_env("OMPI_COMM_WORLD_LOCAL_RANK"),
                       _int_env("OMPI_COMM_WORLD_LOCAL_SIZE"), "Open MPI (mpirun)")
    if "WORLD_SIZE" not in os.environ:
        return DistEnv(0, 1, 0, 1, "single process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                         "or `fieldtrain train --nproc N`, or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    local_rank = _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    local_world = _int_env("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else 1
    return DistEnv(rank, world, local_rank, local_world, "torchrun")


def init_distributed(backend: str = "auto", timeout_s: int = 300) -> tuple[DistEnv, torch.device]:
    env = read_dist_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
        log.info("rank %d/%d initialised %s from %s (master %s:%s)", env.rank, env.world_size, backend,
                 env.source, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    return env, device


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

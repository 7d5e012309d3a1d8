"""Read the launcher's environment and initialise torch.distributed."""

from __future__ import annotations

import datetime
import gc
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("fieldtrain")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 17000   # MASTER_PORT from SLURM_JOB_ID: 15000..31999


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


def _mpi_master() -> tuple[str, str]:
    """Under mpirun without MASTER_ADDR/PORT: rank 0 picks them and broadcasts them over MPI."""
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


def _slurm_first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist such as "gpu[07-09,12],login1" (scontrol expands it when present)."""
    if shutil.which("scontrol"):
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=False, capture_output=True, text=True,
                           timeout=60)
        if r.returncode == 0 and r.stdout.split():
            return r.stdout.split()[0]
    first = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist).group(0)
    return re.sub(r"\[([^-,\]]+)[^\]]*\]", r"\1", first)


def _slurm_master_addr(host: str) -> str:
    """`host` when it resolves, else its NodeAddr from slurm.conf (node names need not be in DNS)."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except socket.gaierror:
        pass
    r = None
    if shutil.which("sinfo"):
        r = subprocess.run(["sinfo", "-h", "-N", "-n", host, "-o", "%o"], check=False, capture_output=True, text=True,
                           timeout=60)
    if r is None or r.returncode != 0 or not r.stdout.split():
        raise ValueError(f"the first node of SLURM_JOB_NODELIST, {host!r}, does not resolve and `sinfo` gives no "
                         "NodeAddr for it: export MASTER_ADDR=<its address> in the batch script")
    return r.stdout.split()[0]


def _slurm_tasks_on_node(spec: str, node_id: int, name: str) -> int:
    """Slurm's compressed task counts, e.g. "2(x3),1", at node `node_id`."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"environment variable {name}={spec!r} is not a Slurm task count like '2(x3),1'")
        counts += [int(m[1])] * int(m[2] or 1)
    if node_id >= len(counts):
        raise ValueError(f"SLURM_NODEID={node_id} is outside {name}={spec!r}")
    return counts[node_id]


def _in_srun() -> bool:
    # the batch shell has SLURM_PROCID=0 and the job's SLURM_NTASKS too; only srun's tasks have a step id
    return all(k in os.environ for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"))


def _slurm_env() -> DistEnv:
    rank, world = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID={rank} is outside SLURM_NTASKS={world}: the step's environment was "
                         "altered; launch the ranks with plain `srun` and do not export SLURM_* yourself")
    for name, slurm_name, value in (("WORLD_SIZE", "SLURM_NTASKS", world), ("RANK", "SLURM_PROCID", rank)):
        if name in os.environ and _int_env(name) != value:
            raise ValueError(f"{name}={os.environ[name]} contradicts {slurm_name}={value} inside srun: unset {name} "
                             "in the batch script (srun numbers its tasks itself), or ask srun for the task count "
                             "you want (--ntasks / --ntasks-per-node)")
    local_rank = _int_env("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0
    node_id = _int_env("SLURM_NODEID") if "SLURM_NODEID" in os.environ else 0
    name = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if n in os.environ), None)
    if name is not None:
        local_world = _slurm_tasks_on_node(os.environ[name], node_id, name)
    else:   # --ntasks-per-node, the same on every node
        name = "SLURM_NTASKS_PER_NODE"
        local_world = _int_env(name) if name in os.environ else 1
    if not 0 <= local_rank < local_world:
        raise ValueError(f"SLURM_LOCALID={local_rank} is outside this node's {local_world} tasks "
                         f"({name}={os.environ.get(name)!r})")
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError("inside srun but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set: "
                             "export MASTER_ADDR=<the first node's address>")
        os.environ["MASTER_ADDR"] = _slurm_master_addr(_slurm_first_host(nodelist))
    if "MASTER_PORT" not in os.environ:
        if "SLURM_JOB_ID" not in os.environ:
            raise ValueError("inside srun but SLURM_JOB_ID is not set: export MASTER_PORT=<a free port>")
        # the same on every rank and across requeues, different for concurrent jobs; below Linux's ephemeral ports
        os.environ["MASTER_PORT"] = str(SLURM_PORT_BASE + _int_env("SLURM_JOB_ID") % SLURM_PORT_SPAN)
    return DistEnv(rank, world, local_rank, local_world, "Slurm")


def _ray_train_env() -> DistEnv | None:
    """Inside a Ray Train worker (Ray Train v2; it has set up torch.distributed already): its context's ranks."""
    if "ray.train" not in sys.modules:   # a Ray Train worker has imported it; nobody else pays for the import
        return None
    import ray.train
    try:
        ctx = ray.train.get_context()
    except RuntimeError:   # not in a Ray Train worker
        return None
    return DistEnv(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), ctx.get_local_world_size(),
                   "Ray Train")


def read_dist_env() -> DistEnv:
    """The launcher's variables. The innermost launcher wins: torchrun's (RANK, WORLD_SIZE, ...), then Open MPI's
    (OMPI_COMM_WORLD_*, also when mpirun runs inside a Slurm job), then Slurm's (SLURM_PROCID, SLURM_NTASKS, ...,
    inside `srun` only); none means one rank. WORLD_SIZE or RANK set by hand must agree with srun's."""
    ray_train = _ray_train_env()
    if ray_train is not None:
        return ray_train
    from_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if "OMPI_COMM_WORLD_SIZE" in os.environ and not from_torchrun and "WORLD_SIZE" not in os.environ:
        rank, world = _int_env("OMPI_COMM_WORLD_RANK"), _int_env("OMPI_COMM_WORLD_SIZE")
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = _mpi_master()
        return DistEnv(rank, world, _int_env("OMPI_COMM_WORLD_LOCAL_RANK"),
                       _int_env("OMPI_COMM_WORLD_LOCAL_SIZE"), "Open MPI (mpirun)")
    if _in_srun() and not from_torchrun:
        return _slurm_env()
    if "WORLD_SIZE" not in os.environ:
        if os.environ.get("SLURM_NTASKS", "1") != "1" and "SLURM_JOB_ID" in os.environ:
            log.warning("SLURM_NTASKS=%s but this process was not started by srun: running as one rank; "
                        "start the ranks with `srun fieldtrain train ...`", os.environ["SLURM_NTASKS"])
        return DistEnv(0, 1, 0, 1, "single process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                         "or `fieldtrain train --nproc N`, or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    local_rank = _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    # The `deepspeed` launcher sets LOCAL_SIZE (and CROSS_RANK) where torchrun sets LOCAL_WORLD_SIZE.
    local_key = next((k for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if k in os.environ), None)
    local_world = _int_env(local_key) if local_key else 1
    return DistEnv(rank, world, local_rank, local_world, "deepspeed launcher" if "CROSS_RANK" in os.environ
                   and not from_torchrun else "torchrun")


def _check_port_free(port: int) -> None:
    """Rank 0 serves the rendezvous store on MASTER_PORT; a taken port would otherwise leave the others waiting."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the store does: TIME_WAIT is no conflict
        try:
            sock.bind(("", port))
        except OSError as e:
            raise ValueError(f"MASTER_PORT={port} is not free on {socket.gethostname()} ({e.strerror}): export "
                             "MASTER_PORT=<a free port> in the batch script") from None


def init_distributed(backend: str = "auto", timeout_s: int = 300) -> tuple[DistEnv, torch.device]:
    env = read_dist_env()
    # DeepSpeed asserts LOCAL_RANK (torchrun's name) whatever launched it: give it the one Slurm or MPI told us, and
    # LOCAL_WORLD_SIZE with it (node membership, for comm.hierarchy). (Only these: RANK/WORLD_SIZE in the environment
    # would make a later read_dist_env take torchrun's branch.)
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_world_size))   # node membership (comm.hierarchy)
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if visible not in (1, env.local_world_size) and env.local_rank >= visible:
            raise ValueError(f"local rank {env.local_rank} of {env.local_world_size} on this node but only {visible} "
                             "GPUs are visible: start one rank per GPU (Slurm: --ntasks-per-node = --gpus-per-node)")
        # all of the node's GPUs visible: ours is local_rank; one GPU bound to each task (--gpu-bind): it is cuda:0
        device = torch.device("cuda", env.local_rank if visible > 1 else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        if env.source == "Slurm" and env.rank == 0:
            _check_port_free(int(os.environ["MASTER_PORT"]))
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        except (dist.DistStoreError, dist.DistNetworkError) as e:  # a rank never came, or the master is unreachable
            raise ValueError(
                f"rank {env.rank}/{env.world_size} ({env.source}): rendezvous at {os.environ['MASTER_ADDR']}:"
                f"{os.environ['MASTER_PORT']} did not complete within dist.timeout_s={timeout_s} s; check that all "
                f"{env.world_size} ranks started and that rank 0's host is reachable on that port ({e})") from None
        log.info("rank %d/%d initialised %s from %s (master %s:%s)", env.rank, env.world_size, backend,
                 env.source, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    return env, device


def destroy_distributed() -> None:
    """Destroy the process group while Python is alive. DDP wrappers and exchanges (reference cycles) hold it; left to
    interpreter exit, gloo's worker thread can drop a tensor's Python object after finalization has begun and the rank
    aborts (signal 6, "terminate called without an active exception") after finished work. Callers drop their own
    references first; the collection frees the cycles."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()

"""One run body for every launcher: `fieldtrain train` (torchrun, mpirun, srun) and Ray Train workers.

    summary = run_training(cfg, resume=True)             # inside a rank: init, train, tear down
    preflight(cfg, nproc=4, resume=False)                # before `--nproc` starts any rank: config, store, run dir

Everything is released on the way out, whatever the exit: the trainer's loader threads, Ray board, writers and
run-directory lock (Trainer.close), then the process group.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import Config

log = logging.getLogger("fieldtrain")
EXIT_PREEMPTED = 75   # EX_TEMPFAIL: a signal stopped the run after a checkpoint; rerun with --resume to continue


def run_training(cfg: Config, resume: bool = False, overwrite: bool = False, until_step: int | None = None,
                 trainer_cls=None) -> dict:
    """Join (or find) the process group, train, and leave it; returns the rank's summary."""
    import torch

    from launch.rendezvous import destroy_distributed, init_distributed
    from trainer.train import Trainer
    owned = not torch.distributed.is_initialized()   # Ray Train sets up its workers' group itself
    env, device = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    if not owned:
        log.info("rank %d/%d (local %d/%d) from %s, on its %s process group", env.rank, env.world_size,
                 env.local_rank, env.local_world_size, env.source, torch.distributed.get_backend())
    try:
        threads = cfg.run.threads_per_rank or default_threads(env.local_world_size)
        torch.set_num_threads(threads)
        set_deterministic(cfg.run.deterministic)
        from trainer.registry import get_model_spec
        trainer_cls = trainer_cls or get_model_spec(cfg.model.name).trainer_class() or Trainer
        summary = trainer_cls(cfg, device, resume=resume, overwrite=overwrite).train(until_step=until_step)
        summary["glibc_hugepages"] = "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")   # launch/cli.py
        summary["intra_op_threads"] = threads
        if env.rank == 0:
            log.info("summary: %s", json.dumps(summary))
        return summary
    finally:
        if owned:
            destroy_distributed()


def default_threads(local_world_size: int, env=os.environ) -> int:
    """Intra-op threads per rank when run.threads_per_rank = 0: OMP_NUM_THREADS where it is set (torchrun, Ray's
    workers and `fieldtrain train --nproc` set it), else the cores this process may run on over the ranks of its
    node. (Ignoring OMP_NUM_THREADS made each rank of bench/comm.py's emulated nodes, one rank per namespace and so
    "alone on its node", run 2 threads on the 2 shared cores: 4 busy threads, and backwards timed at start-up 10x
    their steady-state time while both ranks measured at once.)"""
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def set_deterministic(on: bool) -> None:
    """torch.use_deterministic_algorithms, without its fill of every new tensor (fill_uninitialized_memory): that
    fill only makes reads of uninitialised memory repeatable, which no kernel here does, and it was 22% of the
    demo FNO's step (bench/step.py)."""
    import torch
    torch.use_deterministic_algorithms(on)
    torch.utils.deterministic.fill_uninitialized_memory = not on


def preflight(cfg: Config, nproc: int, resume: bool, overwrite: bool) -> None:
    """The checks every rank would make first, in this process, so a bad config, store or run directory is one
    clear line before any rank starts (the ranks make them again: they may run elsewhere)."""
    from trainer.rundir import RunDirLock, check_fresh_run
    from trainer.train import check_inputs, check_resumable
    from trainer.checkpoint import CheckpointManager

    from trainer.registry import get_model_spec
    source = get_model_spec(cfg.model.name).source_class()
    ds = check_inputs(cfg, nproc)[0] if source is None else source(cfg, 0, nproc).identity()
    if cfg.run_dir.is_dir():
        lock = RunDirLock(cfg.run_dir)
        lock.acquire()     # refused when another run holds it; released at once, the ranks take it for the run
        lock.release()
    check_fresh_run(cfg.run_dir, resume, overwrite)
    latest = CheckpointManager(cfg.run_dir / "checkpoints").latest() if resume else None
    if latest is not None:
        check_resumable(cfg, ds, latest, log_changes=False)   # the ranks log what changes

"""Launchers: the CLI, local ranks, Slurm, Ray Train, and the rendezvous they share."""

import os


def env_rank() -> int:
    """This process's rank as the launcher's environment tells it, before any initialisation (for logging)."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0

"""`--nproc N`: start N local ranks under torchrun (torch.distributed.run) on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(nproc: int, argv: list[str], env: dict | None = None) -> int:
    """Run `fieldtrain <argv>` as `nproc` ranks; returns torchrun's exit code (non-zero if any rank failed)."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: must be >= 1")
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "launch.cli", *argv]
    return subprocess.call(cmd, env=env)

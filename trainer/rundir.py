"""One run per run directory: a lock held for the run's lifetime, and the rule for fresh runs into used directories.

    lock = RunDirLock(cfg.run_dir)
    lock.acquire()          # ValueError naming the holder (pid, host, command, since) if another run holds it
    ...
    lock.release()          # also released by the kernel when the process dies, however it dies

The lock is `flock` on `<run_dir>/.lock`, so a run killed by SIGKILL or a lost node leaves no stale lock on a local
or NFSv4 file system; the file keeps the last holder's pid, host and command for the message and the log. Where
the file system has no locks (flock fails with ENOLCK/EOPNOTSUPP), the file's pid is checked instead: a holder on
this host that no longer runs is stale and taken over; one on another host is refused, naming it.

Only rank 0 takes the lock; the others agree on the outcome (trainer/train.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger("fieldtrain")
LOCK_NAME = ".lock"
RUN_OUTPUTS = ("checkpoints", "metrics.csv", "tb", "summary.json", "config.json")   # what --overwrite removes


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": " ".join(sys.argv)[:300]})


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process (unreadable lock file)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDirLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = os.read(fd, 4096).decode(errors="replace")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"run directory {self.path.parent} is in use by another run: {_describe(previous)}. "
                                 "Wait for it to end, stop it, or give this run another run.name") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._check_pid_lock(previous)
            if previous.strip():
                try:
                    pid = int(json.loads(previous)["pid"])
                except (ValueError, KeyError, TypeError):
                    pid = None
                if pid != os.getpid():
                    log.info("run directory %s: previous holder %s has ended; taking the lock", self.path.parent,
                             _describe(previous))
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_text().encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _check_pid_lock(self, previous: str) -> None:
        """No flock on this file system: judge the recorded holder by its pid (reliable on this host only)."""
        try:
            h = json.loads(previous)
        except ValueError:
            return
        if h.get("host") == socket.gethostname():
            if h.get("pid") != os.getpid() and _alive(int(h["pid"])):
                raise ValueError(f"run directory {self.path.parent} is in use by another run: {_describe(previous)}")
            return
        raise ValueError(f"run directory {self.path.parent} may be in use by {_describe(previous)}; this file system "
                         f"has no locks, so it cannot be checked from {socket.gethostname()}. If that run has ended, "
                         f"delete {self.path} and rerun")

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)   # drops the flock; the file keeps the last holder for the next run's log

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def has_checkpoints(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "checkpoints" / "latest").is_file()


def check_fresh_run(run_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """A fresh run into a directory with checkpoints is refused unless `overwrite` (which removes them)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or replace it")
    run_dir = Path(run_dir)
    if resume or not has_checkpoints(run_dir) or overwrite:
        return
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    raise ValueError(f"run directory {run_dir} already has checkpoints (latest: {latest}); pass --resume to continue "
                     "that run, --overwrite to replace it, or give this run another run.name")


def clear_run_outputs(run_dir: str | Path) -> list[str]:
    """--overwrite: remove a previous run's checkpoints, metrics, TensorBoard logs and summary (after the lock)."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed

"""`--nproc N`: start N local ranks on loopback and supervise them, passing signals on.

The ranks get the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, ..., TORCHELASTIC_*, with the
rendezvous store served by this launcher, as torchrun's agent serves it), so they run exactly as under torchrun.
torchrun itself is not used: SIGUSR1 kills it (it has no handler) and leaves the ranks running, and it reports any
rank's non-zero exit, 75 included, as its own 1.

What the launcher does:
- SIGTERM, SIGINT, SIGUSR1: passed to every rank, which finishes its step, checkpoints and exits 75
  (`launch.run.EXIT_PREEMPTED`); the launcher then exits 75 as well (`--resume` continues the run).
- SIGINT again (an impatient Ctrl-C) while they stop, or ranks still running FIELDTRAIN_STOP_GRACE_S seconds (default
  120) after the first signal: SIGKILL to every rank's process group; exit 128 + the first signal's number.
- a rank that fails (an exit code other than 0 or 75, or killed by signal N: 128 + N) ends the others at once (SIGKILL;
  their peer is gone, so no collective checkpoint could complete) and its code is the launcher's.
- the launcher itself killed, even by SIGKILL: every rank gets SIGKILL from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from launch.run import EXIT_PREEMPTED, default_threads

log = logging.getLogger("fieldtrain")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
GRACE_ENV, DEFAULT_GRACE_S = "FIELDTRAIN_STOP_GRACE_S", 120.0
POLL_S = 0.1
PR_SET_PDEATHSIG = 1           # <linux/prctl.h>


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(launcher_pid: int) -> None:
    """A rank's entry point (`python -c`): die with the launcher, then run `fieldtrain <argv>` as usual."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != launcher_pid:   # the launcher died before prctl: nobody would ever stop this rank
        os._exit(1)
    from trainer.signals import install_stop_handlers
    install_stop_handlers()   # before the heavy imports: a signal forwarded now is honoured at the first step
    import launch.cli
    sys.argv[0] = launch.cli.__file__   # as under `python -m launch.cli`
    sys.exit(launch.cli.main())


def _stop_grace_s(env: dict) -> float:
    value = env.get(GRACE_ENV, str(DEFAULT_GRACE_S))
    try:
        grace = float(value)
    except ValueError:
        grace = -1.0
    if not grace >= 0:
        raise ValueError(f"{GRACE_ENV}={value!r}: expected the seconds (>= 0) that ranks get to checkpoint and exit "
                         f"after a signal before they are killed (default {DEFAULT_GRACE_S:g})")
    return grace


def _rank_env(env: dict, rank: int, nproc: int, port: int) -> dict:
    """What torchrun --nnodes=1 --nproc-per-node=nproc (static rendezvous, agent store) sets for worker `rank`."""
    return {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_RANK": str(rank), "GROUP_RANK": "0",
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc),
            "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")}


def _exit_code(proc: subprocess.Popen) -> int | None:
    """The rank's exit code (128 + N if signal N ended it), None while it runs. The rank is left unreaped (WNOWAIT):
    until the launcher reaps it at the end, its pid, and so its process group's id, cannot name another process."""
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else 128 + info.si_status


def _kill(ranks: list[subprocess.Popen]) -> None:
    for proc in ranks:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # each rank leads its own session: the rank and anything it started
        except (ProcessLookupError, PermissionError):
            pass


def _supervise(ranks: list[subprocess.Popen], received: list[int], grace_s: float) -> int:
    first_signal, deadline = None, float("inf")
    while True:
        codes = [_exit_code(p) for p in ranks]
        failed = next((r for r, c in enumerate(codes) if c not in (None, 0, EXIT_PREEMPTED)), None)
        if failed is not None:
            log.error("launcher: rank %d exited with code %d%s", failed, codes[failed],
                      ": killing the other ranks" if None in codes else "")
            return codes[failed]
        if None not in codes:
            return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0
        while received:
            sig = signal.Signals(received.pop(0))
            if sig == signal.SIGINT and first_signal is not None:
                log.error("launcher: SIGINT again: killing the ranks without a checkpoint")
                return 128 + first_signal
            if first_signal is None:
                first_signal, deadline = sig, time.monotonic() + grace_s
                log.warning("launcher: %s: the ranks finish their step, checkpoint and stop (killed in %g s%s)",
                            sig.name, grace_s, "; Ctrl-C again to kill them now" if sig == signal.SIGINT else "")
            for proc, code in zip(ranks, codes):
                if code is None:
                    os.kill(proc.pid, sig)
        if time.monotonic() >= deadline:
            log.error("launcher: ranks still running %g s after %s (%s): killing them without a checkpoint",
                      grace_s, first_signal.name, GRACE_ENV)
            return 128 + first_signal
        time.sleep(POLL_S)


def spawn_local(nproc: int, argv: list[str], env: dict | None = None) -> int:
    """Run `fieldtrain <argv>` as `nproc` ranks; returns 0, 75 (stopped by a signal after a checkpoint), the first
    failed rank's exit code, or 128 + N when signal N's stop was cut short by a kill."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: must be >= 1")
    env = dict(os.environ if env is None else env)
    env["OMP_NUM_THREADS"] = str(default_threads(nproc, env))     # the rule every rank applies when it is unset
    grace_s = _stop_grace_s(env)
    from torch.distributed import TCPStore
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)   # the port is ours until we exit

    received: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in STOP_SIGNALS}
    entry = [sys.executable, "-c", f"from launch.local import run_rank; run_rank({os.getpid()})"]
    ranks: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            # a session of its own, as torchrun does: the terminal's Ctrl-C reaches the launcher only, which passes
            # it on once; and one killpg per rank ends the rank with anything it started
            ranks.append(subprocess.Popen([*entry, *argv], env=_rank_env(env, rank, nproc, store.port),
                                          start_new_session=True))
        return _supervise(ranks, received, grace_s)
    finally:
        _kill(ranks)   # nothing is left running whatever happened above (after a normal end: only zombies)
        for proc in ranks:
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        del store

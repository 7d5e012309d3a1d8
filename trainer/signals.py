"""Stop signals: SIGUSR1, SIGTERM and SIGINT become "checkpoint after the current step, then exit 75".

A handler only raises a process-local flag; the Trainer agrees on it across ranks at its next step (one small
allreduce it makes anyway), so every rank stops, and checkpoints, after the same step. Installed as early as a rank
starts (this module imports nothing heavy), so a signal during start-up is not lost but honoured at the first step.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("fieldtrain")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
STOP_SIGNAL = threading.Event()


def _request_stop(signum, _frame) -> None:
    if not STOP_SIGNAL.is_set():
        log.warning("%s: stopping with a checkpoint after the current step", signal.Signals(signum).name)
    STOP_SIGNAL.set()


def install_stop_handlers() -> None:
    """Idempotent; a no-op outside the main thread (a Ray Train worker runs the trainer in a thread and its launcher
    handles signals)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _request_stop)

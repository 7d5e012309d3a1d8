"""Signals to `fieldtrain train --nproc 2` (launch/local.py): SIGTERM, SIGINT and SIGUSR1 make every rank checkpoint
and stop (exit 75, `--resume` continues bit for bit); ranks that do not stop, a rank that dies and a launcher that is
SIGKILLed leave no process behind. Every process a test starts carries a marker variable; the test finds them by it
in /proc/*/environ (they are in sessions of their own) and kills what is left whatever the outcome.

Every run has train.max_steps=400 (one cosine schedule for all; the signal lands long before the end). The resumed run
stops 3 steps after the signal's checkpoint (--stop-after-step) and is compared with the uninterrupted run's checkpoint
of that step: the reference run checkpoints every step, so one run serves every test."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import REPO, SMALL_MODEL, fieldtrain
from test_train import CONFIG, assert_same_state, sets

MARKER = "FIELDTRAIN_TEST_SIGNALS"
TOTAL = 400       # train.max_steps of every run here, so all share one cosine schedule; none gets near its end
REF_STEPS = 40    # the uninterrupted reference run checkpoints every step up to here
EXIT_PREEMPTED = 75


def _environ(pid: str) -> bytes:
    try:
        return b"\0" + Path("/proc", pid, "environ").read_bytes()
    except OSError:   # gone, or a kernel thread
        return b""


def ours(marker: str, rank: int | None = None) -> list[int]:
    """Live pids whose environment holds the marker (and RANK=`rank` if given)."""
    needles = [f"\0{MARKER}={marker}\0".encode()] + ([f"\0RANK={rank}\0".encode()] if rank is not None else [])
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()
            and all(n in _environ(p) for n in needles)]


def wait_until(ready, timeout: float, what: str) -> None:
    """Poll `ready`; the timeout is a safety net against a hang, not a measurement."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class Launch:
    """`python -m launch.cli train CONFIG --nproc 2 ...` started in the background, its output in a file."""

    def __init__(self, out: Path, name: str, *extra: str, env: dict | None = None, small_darcy: str):
        self.marker, self.run, self.log = uuid.uuid4().hex, out / name, out / f"{name}.log"
        self.common = sets(f"data.path={small_darcy}", f"run.out_dir={out}", f"run.name={name}",
                           f"train.max_steps={TOTAL}", "run.threads_per_rank=1", *SMALL_MODEL)
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", MARKER: self.marker, **(env or {})}
        full_env.pop("WORLD_SIZE", None)
        with self.log.open("w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", CONFIG, "--nproc", "2",
                                          *self.common, *extra], cwd=REPO, env=full_env, stdout=f,
                                         stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()[-4000:]

    def steps_logged(self) -> int:
        try:
            rows = list(csv.DictReader((self.run / "metrics.csv").open()))
        except OSError:
            return 0
        return max((int(r["step"]) for r in rows if r.get("train_loss") and r["step"].isdigit()), default=0)

    def wait_for_step(self, step: int) -> None:
        def ready():
            assert self.proc.poll() is None, f"exited with {self.proc.returncode} early:\n{self.text()}"
            return self.steps_logged() >= step
        wait_until(ready, 180, f"no step {step} in metrics.csv:\n{self.text()}")

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not exit:\n{self.text()}")

    def kill_leftovers(self) -> None:
        for pid in ours(self.marker):
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def launches():
    started: list[Launch] = []
    yield started
    for launch in started:
        launch.kill_leftovers()


def state_at(checkpoint: Path, out: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    assert (checkpoint / ".metadata").is_file(), f"{checkpoint} is not a complete checkpoint"
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def reference(small_darcy, tmp_path_factory):
    """The uninterrupted run's state after step k: one run checkpointing every step up to REF_STEPS (a signal that
    lands later than that, on a starved machine, gets a straight run of its own)."""
    out = tmp_path_factory.mktemp("straight")

    def straight(name: str, stop: int) -> Path:
        r = fieldtrain("train", CONFIG, "--nproc", "2", "--stop-after-step", str(stop),
                       *sets(f"data.path={small_darcy}", f"run.out_dir={out}", f"run.name={name}",
                             f"train.max_steps={TOTAL}", "run.threads_per_rank=1", "train.ckpt_every=1",
                             f"train.keep_checkpoints={REF_STEPS}", *SMALL_MODEL))
        assert r.returncode == 0, r.stderr[-3000:]
        return out / name / "checkpoints"

    shared = straight("straight", REF_STEPS)

    def state(k: int) -> dict:
        ckpts = shared if k <= REF_STEPS else straight(f"straight_{k}", k)
        return state_at(ckpts / f"step_{k:08d}", out / f"step_{k}.pt")
    return state


def stopped_step(launch: Launch) -> int:
    """The step the run stopped at: summary.json says preempted there and `latest` names its complete checkpoint."""
    summary = json.loads((launch.run / "summary.json").read_text())
    assert summary["preempted"] and not summary["finished"], summary
    step = summary["steps"]
    ckpts = launch.run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{step:08d}"
    assert (ckpts / f"step_{step:08d}" / ".metadata").is_file()
    assert launch.steps_logged() == step
    return step


# ---- a signal to the launcher: checkpoint, stop, resume ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_checkpoints_every_rank_exits_75_and_resume_is_exact(sig, small_darcy, tmp_path, launches, reference):
    # a safety net well below the default 120 s: a step and a checkpoint take well under a second here
    launch = Launch(tmp_path, "signalled", env={"FIELDTRAIN_STOP_GRACE_S": "30"}, small_darcy=small_darcy)
    launches.append(launch)
    launch.wait_for_step(3)
    launch.proc.send_signal(sig)
    rc = launch.wait()
    assert rc == EXIT_PREEMPTED, launch.text()
    assert ours(launch.marker) == [], "processes of the run outlived the launcher"
    text = launch.log.read_text()
    assert f"launcher: {sig.name}: the ranks finish their step, checkpoint and stop" in text, text[-4000:]
    for rank in (0, 1):   # each rank got the signal once, from the launcher
        assert text.count(f"rank{rank}] WARNING {sig.name}: stopping with a checkpoint after the current step") == 1, \
            text[-4000:]
    step = stopped_step(launch)
    assert step >= 3

    # --resume continues from that checkpoint; 3 steps later it matches the uninterrupted run bit for bit
    r = fieldtrain("train", CONFIG, "--nproc", "2", *launch.common, "--resume", "--stop-after-step", str(step + 3))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = launch.run / "checkpoints"
    assert f"resumed from {ckpts / f'step_{step:08d}'} at step {step}" in r.stderr, r.stderr[-3000:]
    assert (ckpts / "latest").read_text().strip() == f"step_{step + 3:08d}"
    assert_same_state(state_at(ckpts / f"step_{step + 3:08d}", tmp_path / "resumed.pt"), reference(step + 3))


# ---- ranks that do not stop ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("how", ["second_sigint", "grace_period"])
def test_ranks_that_do_not_stop_are_killed(how, small_darcy, tmp_path, launches):
    """Ranks stuck (SIGSTOPped here, as in a hung collective) cannot checkpoint: a second Ctrl-C, or
    FIELDTRAIN_STOP_GRACE_S after the signal, kills them and the launcher exits 128 + the first signal."""
    first = signal.SIGINT if how == "second_sigint" else signal.SIGTERM
    env = {"FIELDTRAIN_STOP_GRACE_S": "1"} if how == "grace_period" else {}
    launch = Launch(tmp_path, "stuck", env=env, small_darcy=small_darcy)
    launches.append(launch)
    launch.wait_for_step(2)
    ranks = ours(launch.marker, 0) + ours(launch.marker, 1)
    assert len(ranks) == 2
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    launch.proc.send_signal(first)
    if how == "second_sigint":
        wait_until(lambda: "launcher: SIGINT: the ranks finish" in launch.log.read_text(), 60, launch.text())
        launch.proc.send_signal(signal.SIGINT)
    rc = launch.wait()
    assert rc == 128 + first, launch.text()
    assert ours(launch.marker) == [], "processes of the run outlived the launcher"
    expected = ("launcher: SIGINT again: killing the ranks" if how == "second_sigint" else
                "launcher: ranks still running 1 s after SIGTERM (FIELDTRAIN_STOP_GRACE_S): killing them")
    assert expected in launch.log.read_text(), launch.text()
    assert not (launch.run / "checkpoints" / "latest").exists()


def test_a_bad_grace_period_is_refused_before_any_rank_starts():
    from launch.local import spawn_local
    with pytest.raises(ValueError, match="FIELDTRAIN_STOP_GRACE_S='soon': expected the seconds"):
        spawn_local(2, ["train", CONFIG], env={**os.environ, "FIELDTRAIN_STOP_GRACE_S": "soon"})


# ---- failures ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_rank_that_dies_ends_the_other_and_its_status_is_the_launchers(small_darcy, tmp_path, launches):
    launch = Launch(tmp_path, "crash", small_darcy=small_darcy)
    launches.append(launch)
    launch.wait_for_step(2)
    (victim,) = ours(launch.marker, 1)
    os.kill(victim, signal.SIGKILL)   # e.g. the kernel's OOM killer
    rc = launch.wait()
    assert rc == 128 + signal.SIGKILL, launch.text()
    assert ours(launch.marker) == [], "rank 0 outlived the launcher"
    assert "launcher: rank 1 exited with code 137: killing the other ranks" in launch.log.read_text(), launch.text()


@pytest.mark.slow
def test_sigkilled_launcher_leaves_no_rank_behind(small_darcy, tmp_path, launches):
    launch = Launch(tmp_path, "orphans", small_darcy=small_darcy)
    launches.append(launch)
    launch.wait_for_step(2)
    assert len(ours(launch.marker)) >= 3   # the launcher and two ranks
    launch.proc.kill()
    launch.proc.wait()
    # the kernel sends each rank SIGKILL when the launcher dies (PR_SET_PDEATHSIG); init reaps them
    wait_until(lambda: ours(launch.marker) == [], 30, f"ranks outlived the SIGKILLed launcher: {ours(launch.marker)}")
    # ... killed, not finished unsupervised (orphans would train on to the end and write the summary)
    assert not (launch.run / "summary.json").exists() and launch.steps_logged() < TOTAL

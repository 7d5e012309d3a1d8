"""`fieldtrain launch slurm` against a real Slurm on this machine: munged, slurmctld and two slurmd (nodes n1, n2)
started from a generated slurm.conf; training jobs, preemption with requeue and resume, bad input."""

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMALL_MODEL, fieldtrain
from test_train import final_state

from launch.local import free_port

CONFIG = str(REPO / "configs" / "darcy_fno.toml")
STEPS = 150
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)


def _munge_works() -> bool:
    return sh("munge", "-n").returncode == 0


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A two-node cluster on loopback (both nodes are this machine); SLURM_CONF points the tools at it."""
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(t) is None
               and not Path("/usr/sbin", t).exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (`make test` installs slurm-wlm and munge)")
    if os.geteuid() != 0:
        pytest.skip("starting munged, slurmctld and slurmd for the test (SlurmUser=root) needs root")
    d = tmp_path_factory.mktemp("slurm")
    munged_pid_file = None
    if not _munge_works():   # start munged, unless one is already serving (then it is left alone)
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        munged_pid_file = Path("/run/munge/munged.pid")
        assert _munge_works()
    host = socket.gethostname().split(".")[0]
    for node in ("n1", "n2"):
        (d / "spool" / node).mkdir(parents=True)
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=fieldtrain
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{free_port()},{free_port()}] CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES OverSubscribe=YES MaxTime=INFINITE State=UP
""")
    (d / "state").mkdir()
    daemons = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(conf))
        try:
            daemons.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.STDOUT))
            for node in ("n1", "n2"):
                daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf), "-N", node],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + 60
            while _sinfo_states() != ["idle", "idle"]:
                if time.monotonic() > deadline or any(p.poll() is not None for p in daemons):
                    pytest.fail(f"Slurm did not come up (sinfo: {_sinfo_states()}):\n" + _tail(d / "slurmctld.log"))
                time.sleep(0.5)
            yield d
        finally:
            jobs = sh("squeue", "-h", "-o", "%i").stdout.split()
            if jobs:
                sh("scancel", *jobs)
                _wait_until(lambda: not sh("squeue", "-h").stdout.strip(), 30)
            sh("scontrol", "shutdown")
            for p in daemons:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if munged_pid_file is not None and munged_pid_file.exists():
                os.kill(int(munged_pid_file.read_text()), 15)


def _sinfo_states() -> list[str]:
    r = sh("sinfo", "-h", "-N", "-o", "%T")
    return sorted(r.stdout.split()) if r.returncode == 0 else []


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text()[-n:] if path.exists() else f"({path} missing)"


def _wait_until(ready, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.2)
    return False


def job_info(job: str) -> dict:
    out = sh("scontrol", "-o", "show", "job", job).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def wait_for_job(job: str, log: Path, restarts: int = 0, timeout: float = 240) -> dict:
    """Poll until the job ends (no accounting here: scontrol keeps finished jobs for MinJobAge=300 s). A requeued
    job would wait out a begin-time delay; it is released at once. A job that requeues itself shows FAILED for a
    moment (its Restarts already counted) before it is PENDING again, so only COMPLETED after `restarts`
    requeues ends the wait at once; any other end must last 20 s, and not follow a requeue its log announced, to
    count."""
    released, settle, pending_since = 0, None, None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        text = log.read_text() if log.exists() else ""
        # the batch script announced a requeue that has not started yet (each run logs its SLURM_RESTART_COUNT):
        # under load slurmctld can leave the job FAILED for longer than the settle time before it is PENDING again
        requeue_pending = text.count("on a signal): requeueing job") >= text.count("SLURM_RESTART_COUNT=") > 0
        if info.get("JobState") in TERMINAL:
            if (info["JobState"] == "COMPLETED" and int(info.get("Restarts", 0)) >= restarts) or \
                    (settle is not None and time.monotonic() > settle and not requeue_pending):
                return info
            settle = settle or time.monotonic() + 20
        else:
            settle = None
        # Not in the second of the requeue: slurmd revoked the old run's credential then, and refuses a new one with
        # the same timestamp (seconds): "Killing non-startable batch JobId=3: Job credential revoked", job FAILED.
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) > released:
            pending_since = pending_since or time.monotonic()
            if time.monotonic() > pending_since + 2 and \
                    sh("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0:
                released, pending_since = int(info["Restarts"]), None
        time.sleep(0.5)
    pytest.fail(f"job {job} did not finish in {timeout} s: {job_info(job)}\n{_tail(log)}")


def submit(tmp_path: Path, name: str, *extra: str) -> tuple[str, Path]:
    """`fieldtrain launch slurm` a 2-node x 1-task CPU run of the small model; returns (job id, its log)."""
    log = tmp_path / f"{name}.out"
    r = fieldtrain("launch", "slurm", CONFIG, "--nodes", "2", "--tasks-per-node", "1", "--time", "00:10:00",
                   "--job-name", name, "--output", str(log), *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.fullmatch(r"\d+\n", r.stdout), r.stdout
    return r.stdout.strip(), log


def run_sets(small_darcy: str, out: Path, name: str) -> list[str]:
    """Deterministic on CPU whatever the launcher: one intra-op thread per rank."""
    return [a for o in (f"data.path={small_darcy}", f"run.out_dir={out}", f"run.name={name}", f"train.max_steps={STEPS}",
                        "run.threads_per_rank=1", *SMALL_MODEL) for a in ("--set", o)]


def train_losses(run_dir: Path) -> list[str]:
    """The train_loss column as written (strings: compared exactly)."""
    return [row["train_loss"] for row in csv.DictReader((run_dir / "metrics.csv").open()) if row["train_loss"]]


@pytest.fixture(scope="module")
def straight(slurm, small_darcy, tmp_path_factory):
    """An uninterrupted 2-rank run under Slurm, shared by the tests below."""
    out = tmp_path_factory.mktemp("slurm_runs")
    job, log = submit(out, "straight", *run_sets(small_darcy, out, "straight"))
    info = wait_for_job(job, log)
    return {"job": job, "info": info, "log": log, "run": out / "straight"}


@pytest.mark.slow
def test_two_task_job_trains_through_slurm(straight):
    info, text = straight["info"], straight["log"].read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    summary = json.loads((straight["run"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS and summary["finished"]
    assert summary["replica_max_abs_diff"] == 0.0
    assert len(train_losses(straight["run"])) == STEPS
    # both nodes' tasks rendezvoused through Slurm's variables; n1 does not resolve, so its NodeAddr is the master
    assert re.search(r"rank 0/2 initialised gloo from Slurm \(master 127\.0\.0\.1:\d+\)", text), text[-3000:]
    assert info["NodeList"] == "n[1-2]" and info["NumTasks"] == "2"


@pytest.mark.slow
def test_deepspeed_zero3_with_int8_trains_through_slurm(slurm, small_darcy, tmp_path):
    """The sharded engines run under every launcher: DeepSpeed joins the process group Slurm's variables made."""
    sets = run_sets(small_darcy, tmp_path, "zero3") + [a for o in ("parallel.engine=deepspeed", "parallel.zero_stage=3",
                                                                   "comm.compressor=int8", "train.max_steps=30")
                                                  for a in ("--set", o)]
    job, log = submit(tmp_path, "zero3", *sets)
    info = wait_for_job(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log.read_text()[-3000:]
    summary = json.loads((tmp_path / "zero3" / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["compressor"] == "int8" and summary["world_size"] == 2
    assert summary["steps"] == 30 and summary["finished"] and summary["replica_max_abs_diff"] == 0.0
    assert summary["compression_ratio"] > 3   # int8 codes + one fp32 scale per 256: ~3.9x fewer bytes than fp32


@pytest.mark.slow
def test_slurm_and_torchrun_give_the_same_loss_trajectory(straight, small_darcy, tmp_path):
    r = fieldtrain("train", CONFIG, "--nproc", "2", *run_sets(small_darcy, tmp_path, "torchrun"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from torchrun" in r.stderr
    assert train_losses(tmp_path / "torchrun") == train_losses(straight["run"])


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_parameters(slurm, straight, small_darcy, tmp_path):
    run = tmp_path / "preempted"
    job, log = submit(tmp_path, "preempted", *run_sets(small_darcy, tmp_path, "preempted"))
    # the warning Slurm sends before the time limit (--signal=B:USR1@120) goes to the batch shell only: the same here
    assert _wait_until(lambda: (run / "metrics.csv").exists() and len(train_losses(run)) >= 5, 120), _tail(log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    info = wait_for_job(job, log, restarts=1)
    text = log.read_text()
    daemons = "\n".join(f"--- {p.name}\n{_tail(p, 2000)}" for p in sorted(slurm.glob("*.log")))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:], daemons)
    assert info["Restarts"] == "1", text[-4000:]
    assert "SLURM_RESTART_COUNT=0" in text and "SLURM_RESTART_COUNT=1" in text
    # every rank exited 75 (EX_TEMPFAIL) after its checkpoint, srun passed that on, and only that requeued the job
    assert "fieldtrain: training step exited with 75 (checkpointed on a signal): requeueing job" in text, text[-4000:]
    assert "fieldtrain: training step exited with 0: done" in text, text[-4000:]
    assert len(re.findall(r"rank\d\] WARNING SIGUSR1: stopping with a checkpoint after the current step", text)) == 2, text[-4000:]
    stopped = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", text)
    assert stopped, text[-4000:]
    step = int(stopped[2])
    assert 5 <= step < STEPS and int(stopped[1]) == step
    assert text.index("requeueing job") < text.index("resumed from")
    a, b = final_state(straight["run"]), final_state(run)
    assert a["trainer"]["step"] == b["trainer"]["step"] == STEPS
    for k, v in a["model_optim"]["model"].items():
        assert torch.equal(v, b["model_optim"]["model"][k]), k
    for k, v in a["model_optim"]["optim"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["model_optim"]["optim"]["state"][k][name]), (k, name)
    assert train_losses(run) == train_losses(straight["run"])


@pytest.mark.slow
def test_failed_step_is_not_requeued(slurm, small_darcy, tmp_path):
    """Only 75 requeues: ranks that fail (here: exit 2, no dataset at data.path) fail the job, once."""
    sets = run_sets(small_darcy, tmp_path, "failed") + ["--set", f"data.path={tmp_path / 'missing.zarr'}"]
    job, log = submit(tmp_path, "failed", *sets)
    info = wait_for_job(job, log)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text[-4000:])
    assert info["Restarts"] == "0", text[-4000:]
    assert f"fieldtrain: training step exited with 2: failed, not requeueing job {job}" in text, text[-4000:]


# ---- without a cluster ---------------------------------------------------------------------------------------

def _launch(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PATH": path} if path is not None else {})}
    return sh(sys.executable, "-m", "launch.cli", "launch", "slurm", *args, cwd=REPO, env=env, timeout=120)


def test_missing_sbatch_says_how_to_fix(tmp_path):
    r = _launch(CONFIG, "--nodes", "1", "--tasks-per-node", "2", path=str(tmp_path))
    assert r.returncode == 2
    assert "`sbatch` not found" in r.stderr and "install the Slurm client tools" in r.stderr, r.stderr


def test_dry_run_prints_the_rendered_script(tmp_path):
    r = _launch(CONFIG, "--nodes", "3", "--tasks-per-node", "2", "--time", "02:30:00", "--partition", "short",
                "--job-name", "darcy", "--output", "logs/%x-%j.out", "--set", "optim.lr=1e-3",
                "--sbatch-arg=--mail-type=END", "--dry-run", path=str(tmp_path))   # no sbatch needed
    assert r.returncode == 0, r.stderr
    script = r.stdout
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=02:30:00",
                 "#SBATCH --partition=short", "#SBATCH --job-name=darcy", "#SBATCH --output=logs/%x-%j.out",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --mail-type=END",
                 f"ARGS=({CONFIG} --set optim.lr=1e-3)", f"FIELDTRAIN=({sys.executable} -m launch.cli)"):
        assert line in script.splitlines(), (line, script)
    assert script.count("#SBATCH --nodes") == 1 and "dist.backend=gloo" in script
    assert sh("bash", "-n", input=script).returncode == 0


def dry_run(capsys, *args: str) -> str:
    """`fieldtrain launch slurm CONFIG ARGS --dry-run` in this process; user errors raise ValueError."""
    from launch.cli import build_parser
    parsed = build_parser().parse_args(["launch", "slurm", CONFIG, *args, "--dry-run"])
    assert parsed.func(parsed) == 0
    return capsys.readouterr().out


def test_dry_run_gpu_and_sweep_templates(capsys):
    gpu = dry_run(capsys, "--nodes", "2", "--tasks-per-node", "4", "--gpus-per-node", "4")
    assert "#SBATCH --gpus-per-node=4" in gpu and "dist.backend=nccl" in gpu
    sweep = dry_run(capsys, "--nodes", "1", "--tasks-per-node", "2", "--sweep", "comm.compressor=none",
                    "--sweep", "comm.compressor=topk comm.topk.density=0.1")
    assert "#SBATCH --array=0-1" in sweep
    assert "SWEEP=(\n  comm.compressor=none\n  'comm.compressor=topk comm.topk.density=0.1'\n)" in sweep
    assert sh("bash", "-n", input=sweep).returncode == 0


@pytest.mark.parametrize("args, named", [
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "--gpus-per-node 4 with --tasks-per-node 2"),
    (["--tasks-per-node", "1", "--set", "optim.lrr=1"], "optim.lrr"),
    (["--tasks-per-node", "1", "--time", "2h"], "--time '2h'"),
    (["--tasks-per-node", "1", "--sweep", "comm.compressor=none", "--array", "0-3"], "only 1 --sweep entries"),
    (["--tasks-per-node", "1", "--sweep", "comm.compressor=zip"], "comm.compressor"),
    (["--tasks-per-node", "1", "--sbatch-arg=mail-type=END"], "give a long sbatch option"),
])
def test_bad_launch_requests_are_refused_before_submitting(capsys, args, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        dry_run(capsys, "--nodes", "1", *args)


def test_templates_share_one_preemption_block():
    blocks = {p.name: re.search(r"# >>> fieldtrain:preemption.*# <<< fieldtrain:preemption", p.read_text(), re.DOTALL)[0]
              for p in (REPO / "slurm").glob("*.sbatch")}
    assert len(blocks) == 3 and len(set(blocks.values())) == 1, blocks.keys()
    for p in (REPO / "slurm").glob("*.sbatch"):
        text = p.read_text()
        assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text, p.name
        assert sh("bash", "-n", str(p)).returncode == 0, p.name


@pytest.mark.slow
def test_study_on_the_slurm_backend_runs_each_cell_as_a_job(slurm, small_darcy, tmp_path):
    """`fieldtrain study --backend slurm`: a 2-cell study, each cell one job on the test cluster."""
    sets = ", ".join(json.dumps(s) for s in [*SMALL_MODEL, f"data.path={small_darcy}", "train.ckpt_every=0"])
    study = tmp_path / "s.toml"
    study.write_text(f'[study]\nconfig = "{CONFIG}"\nsteps = 3\nwarmup_steps = 1\nset = [{sets}]\n'
                     '[axes]\nworld_size = [1, 2]\n')
    out = tmp_path / "study"
    big = tmp_path / "big.toml"                # the test cluster's nodes have 4 CPUs: 8 ranks do not fit one
    big.write_text(study.read_text().replace("world_size = [1, 2]", "world_size = [8]"))
    r = fieldtrain("study", str(big), "--backend", "slurm", "--out", str(out))
    assert r.returncode == 2 and "study cell world_size=8: 8 ranks; the slurm backend places at most 4" in r.stderr
    r = fieldtrain("study", str(study), "--backend", "slurm", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(x["world_size"] for x in recs) == [1, 2]
    for x in recs:
        assert x["status"] == "ok" and x["link"] == "slurm" and x["slurm_job"].isdigit() and x["steps"] == 3, x
    assert next(x for x in recs if x["world_size"] == 2)["replicas_consistent"]

"""read_dist_env: which launcher's variables are used (torchrun, Open MPI, Slurm's srun) and what is refused."""

import logging
import os
import socket

import pytest

from launch import rendezvous
from launch.rendezvous import DistEnv, read_dist_env


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No launcher variables from the shell that runs the tests (it may itself be a Slurm job)."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "TORCHELASTIC_")) or name in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name)


def srun_env(monkeypatch, rank=3, ntasks=4, localid=1, nodeid=1, tasks_per_node="2(x2)", job_id=4242,
             nodelist="localhost,n[2-3]", **extra):
    """What srun gives a task of step 0 (a subset: the variables rendezvous reads)."""
    env = {"SLURM_PROCID": rank, "SLURM_NTASKS": ntasks, "SLURM_LOCALID": localid, "SLURM_NODEID": nodeid,
           "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_JOB_ID": job_id, "SLURM_STEP_ID": 0,
           "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist, **extra}
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


def without_slurm_tools(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))   # no scontrol, no sinfo


def test_no_launcher_is_one_process():
    assert read_dist_env() == DistEnv(0, 1, 0, 1, "single process")


def test_torchrun_variables_unchanged(monkeypatch):
    for k, v in {"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 1, "LOCAL_WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(k, str(v))
    assert read_dist_env() == DistEnv(1, 2, 1, 2, "torchrun")


def test_srun_task_reads_slurm(monkeypatch):
    srun_env(monkeypatch)
    assert read_dist_env() == DistEnv(3, 4, 1, 2, "Slurm")
    assert os.environ["MASTER_ADDR"] == "localhost"   # the first host of the node list, resolvable
    assert os.environ["MASTER_PORT"] == str(15000 + 4242 % 17000)   # the same on every rank and after a requeue


@pytest.mark.parametrize("spec, node, expected", [("4", 0, 4), ("2(x3),1", 2, 2), ("2(x3),1", 3, 1), ("1,3", 1, 3)])
def test_local_world_size_from_slurm_task_counts(monkeypatch, spec, node, expected):
    srun_env(monkeypatch, rank=0, ntasks=8, localid=0, nodeid=node, tasks_per_node=spec)
    assert read_dist_env().local_world_size == expected


def test_job_level_task_counts_when_the_step_has_none(monkeypatch):
    srun_env(monkeypatch)
    monkeypatch.delenv("SLURM_STEP_TASKS_PER_NODE")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x2)")
    assert read_dist_env().local_world_size == 2
    monkeypatch.delenv("SLURM_TASKS_PER_NODE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    assert read_dist_env().local_world_size == 2


def test_master_addr_and_port_from_the_environment_win(monkeypatch):
    srun_env(monkeypatch, MASTER_ADDR="10.0.0.7", MASTER_PORT="23456")
    assert read_dist_env().source == "Slurm"
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.7", "23456")


@pytest.mark.parametrize("nodelist, first", [("login1", "login1"), ("n[01-04,07],m1", "n01"), ("gpu[7]", "gpu7"),
                                             ("rack[2-3]-n[5-6],x", "rack2-n5"), ("a1,b[1-2]", "a1")])
def test_first_host_of_a_hostlist_without_scontrol(monkeypatch, tmp_path, nodelist, first):
    without_slurm_tools(monkeypatch, tmp_path)
    assert rendezvous._slurm_first_host(nodelist) == first


def test_an_unresolvable_first_node_without_sinfo_asks_for_master_addr(monkeypatch, tmp_path):
    without_slurm_tools(monkeypatch, tmp_path)
    srun_env(monkeypatch, nodelist="no-such-node-fieldtrain[1-2]")
    with pytest.raises(ValueError, match=r"'no-such-node-fieldtrain1'.*export MASTER_ADDR"):
        read_dist_env()


@pytest.mark.parametrize("extra, message", [
    ({"WORLD_SIZE": "8"}, r"WORLD_SIZE=8 contradicts SLURM_NTASKS=4 inside srun: unset WORLD_SIZE"),
    ({"WORLD_SIZE": "4", "RANK": "0"}, r"RANK=0 contradicts SLURM_PROCID=3 inside srun: unset RANK"),
    ({"SLURM_PROCID": "4"}, r"SLURM_PROCID=4 is outside SLURM_NTASKS=4"),
    ({"SLURM_NTASKS": "four"}, r"SLURM_NTASKS='four' is not an integer"),
    ({"SLURM_LOCALID": "2"}, r"SLURM_LOCALID=2 is outside this node's 2 tasks"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2x2"}, r"SLURM_STEP_TASKS_PER_NODE='2x2' is not a Slurm task count"),
    ({"SLURM_NODEID": "5"}, r"SLURM_NODEID=5 is outside SLURM_STEP_TASKS_PER_NODE='2\(x2\)'"),
])
def test_contradictory_slurm_environment_is_refused(monkeypatch, extra, message):
    srun_env(monkeypatch, **extra)
    with pytest.raises(ValueError, match=message):
        read_dist_env()


def test_world_size_and_rank_that_agree_with_srun_are_fine(monkeypatch):
    srun_env(monkeypatch, WORLD_SIZE="4", RANK="3")
    assert read_dist_env() == DistEnv(3, 4, 1, 2, "Slurm")


def test_torchrun_inside_srun_wins(monkeypatch):
    """`srun --ntasks-per-node=1 torchrun --nproc-per-node=8 ...`: torchrun's workers, not srun's tasks, are the ranks."""
    srun_env(monkeypatch, rank=1, ntasks=2, localid=0, tasks_per_node="1(x2)")
    for k, v in {"RANK": 9, "WORLD_SIZE": 16, "LOCAL_RANK": 1, "LOCAL_WORLD_SIZE": 8, "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": 29500, "TORCHELASTIC_RUN_ID": "none"}.items():
        monkeypatch.setenv(k, str(v))
    assert read_dist_env() == DistEnv(9, 16, 1, 8, "torchrun")


def test_mpirun_inside_a_slurm_job_wins(monkeypatch):
    """mpirun in an allocation starts its daemons with srun, so its ranks carry a step's SLURM_* as well."""
    srun_env(monkeypatch, rank=0, ntasks=2, localid=0, nodeid=0, tasks_per_node="1(x2)")
    for k, v in {"OMPI_COMM_WORLD_RANK": 5, "OMPI_COMM_WORLD_SIZE": 8, "OMPI_COMM_WORLD_LOCAL_RANK": 1,
                 "OMPI_COMM_WORLD_LOCAL_SIZE": 4, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(k, str(v))
    assert read_dist_env() == DistEnv(5, 8, 1, 4, "Open MPI (mpirun)")


def test_batch_shell_without_srun_is_one_process_with_a_hint(monkeypatch, caplog):
    """The batch script itself has SLURM_PROCID=0 and the job's SLURM_NTASKS, but no step id."""
    srun_env(monkeypatch, rank=0, localid=0, nodeid=0)
    monkeypatch.delenv("SLURM_STEP_ID")
    with caplog.at_level(logging.WARNING, logger="fieldtrain"):
        assert read_dist_env() == DistEnv(0, 1, 0, 1, "single process")
    assert "start the ranks with `srun" in caplog.text


def test_a_taken_master_port_is_named_before_rendezvous(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srun_env(monkeypatch, rank=0, ntasks=2, localid=0, nodeid=0, tasks_per_node="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with pytest.raises(ValueError, match=rf"MASTER_PORT={port} is not free on .*export MASTER_PORT"):
            rendezvous.init_distributed("gloo", timeout_s=5)
    assert not rendezvous.dist.is_initialized()

"""`fieldtrain launch slurm`: render a batch script from the templates in slurm/ and submit it with sbatch.

The templates are the one source of truth and work as they are (`sbatch slurm/cpu.sbatch CONFIG ...`). Rendering
rewrites the values of their `#SBATCH` lines (adding the ones a template lacks) and the blocks between
`# >>> fieldtrain:NAME` and `# <<< fieldtrain:NAME`: `command` (entry point and arguments) and `sweep` (the array's
overrides).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SLURM_DIR = Path(__file__).resolve().parents[1] / "slurm"
TEMPLATES = {"cpu": "cpu.sbatch", "gpu": "multinode_gpu.sbatch", "sweep": "sweep_array.sbatch"}
# read by launch/rendezvous.py; inherited by the job through sbatch's default --export=ALL, they would override
# what srun tells each task
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")
log = logging.getLogger("fieldtrain")


@dataclass
class SlurmJob:
    config: str
    nodes: int
    tasks_per_node: int
    time: str | None = None
    partition: str | None = None
    gpus_per_node: int = 0
    array: str | None = None
    sweep: list[str] = field(default_factory=list)      # one entry per array index: "k=v k2=v2"
    overrides: list[str] = field(default_factory=list)  # --set for every run
    job_name: str | None = None
    output: str | None = None
    sbatch_args: list[str] = field(default_factory=list)  # extra "--option=value" lines
    script: str | None = None                             # a template of one's own, with the same markers

    def template(self) -> Path:
        if self.script:
            return Path(self.script)
        kind = "sweep" if self.sweep or self.array else "gpu" if self.gpus_per_node else "cpu"
        return SLURM_DIR / TEMPLATES[kind]


def _array_max_index(spec: str) -> int:
    """Largest index of an --array spec such as "0-7:2,9%4"."""
    indices = []
    for part in spec.split("%")[0].split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::\d+)?)?", part.strip())
        if m is None:
            raise ValueError(f"--array {spec!r}: expected indices like 0-3, 1,3,5 or 0-7:2, optionally with %N")
        indices.append(int(m[2] or m[1]))
    return max(indices)


def validate(job: SlurmJob) -> None:
    """Everything that can be wrong with the request, checked before anything is queued."""
    if job.nodes < 1 or job.tasks_per_node < 1:
        raise ValueError(f"--nodes {job.nodes} --tasks-per-node {job.tasks_per_node}: both must be >= 1")
    if job.gpus_per_node and job.gpus_per_node != job.tasks_per_node:
        raise ValueError(f"--gpus-per-node {job.gpus_per_node} with --tasks-per-node {job.tasks_per_node}: "
                         "fieldtrain runs one rank per GPU; pass the same number to both")
    if job.time is not None and not re.fullmatch(r"\d+(-\d+)?(:\d+){0,2}", job.time):
        raise ValueError(f"--time {job.time!r}: expected HH:MM:SS, MM, or D-HH:MM:SS")
    if not Path(job.config).is_file():
        raise ValueError(f"config file {job.config!r} does not exist")
    if not job.template().is_file():
        raise ValueError(f"batch script template {str(job.template())!r} does not exist")
    for arg in job.sbatch_args:
        if not arg.startswith("--"):
            raise ValueError(f"--sbatch-arg {arg!r}: give a long sbatch option, e.g. --sbatch-arg=--mail-type=END")
    if job.array and job.sweep and _array_max_index(job.array) >= len(job.sweep):
        raise ValueError(f"--array {job.array!r} reaches index {_array_max_index(job.array)} but there are only "
                         f"{len(job.sweep)} --sweep entries (indices 0-{len(job.sweep) - 1})")
    # a typo in an override fails here, not after hours in the queue
    from trainer.config import load_config
    load_config(job.config, job.overrides)
    for entry in job.sweep:
        load_config(job.config, [*job.overrides, *entry.split()])


def _set_directive(script: str, option: str, value: str | None) -> str:
    """Replace `#SBATCH --option...` (or add it after the last #SBATCH line); value None: a flag."""
    line = f"#SBATCH {option}" + ("" if value is None else f"={value}")
    pattern = re.compile(rf"^#SBATCH[ \t]+{re.escape(option)}(?:[= \t].*)?$", re.MULTILINE)
    if pattern.search(script):
        return pattern.sub(lambda _: line, script, count=1)
    last = list(re.finditer(r"^#SBATCH.*$", script, re.MULTILINE))
    assert last, "a template without #SBATCH lines"
    end = last[-1].end()
    return script[:end] + "\n" + line + script[end:]


def _set_block(script: str, name: str, body: str) -> str:
    pattern = re.compile(rf"^(# >>> fieldtrain:{name}\b[^\n]*\n)(.*?)(^# <<< fieldtrain:{name}$)", re.MULTILINE | re.DOTALL)
    if not pattern.search(script):
        raise ValueError(f"the batch script template has no '# >>> fieldtrain:{name}' ... '# <<< fieldtrain:{name}' "
                         "block to fill in; start from one of the scripts in slurm/")
    return pattern.sub(lambda m: m[1] + body + m[3], script, count=1)


def render(job: SlurmJob) -> str:
    script = job.template().read_text()
    directives = {"--nodes": str(job.nodes), "--ntasks-per-node": str(job.tasks_per_node), "--time": job.time,
                  "--partition": job.partition, "--job-name": job.job_name, "--output": job.output,
                  "--gpus-per-node": str(job.gpus_per_node) if job.gpus_per_node else None,
                  "--array": job.array or (f"0-{len(job.sweep) - 1}" if job.sweep else None)}
    for option, value in directives.items():
        if value is not None:
            script = _set_directive(script, option, value)
    for arg in job.sbatch_args:
        option, eq, value = arg.partition("=")
        script = _set_directive(script, option, value if eq else None)
    entry = [sys.executable, "-m", "launch.cli"]   # this interpreter, so the job runs the same installation
    args = [str(Path(job.config).resolve()), *[a for o in job.overrides for a in ("--set", o)]]
    script = _set_block(script, "command", f"FIELDTRAIN=({shlex.join(entry)})\nARGS=({shlex.join(args)})\n")
    if job.sweep:
        entries = "".join(f"  {shlex.quote(e)}\n" for e in job.sweep)
        script = _set_block(script, "sweep", f"SWEEP=(\n{entries})\n")
    return script


def submit(script: str) -> str:
    """sbatch the script (on stdin); returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ValueError("`sbatch` not found on PATH: install the Slurm client tools (Debian: apt-get install "
                         "slurm-client) or run this on the cluster's login node; --dry-run prints the script without it")
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    dropped = sorted(set(os.environ) & set(RENDEZVOUS_VARS))
    if dropped:
        log.warning("not passing %s to the job (srun tells each rank its own); to fix MASTER_PORT or "
                    "MASTER_ADDR, export them in the batch script", ", ".join(dropped))
    r = subprocess.run([sbatch, "--parsable"], input=script, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise ValueError(f"sbatch refused the job: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip().split(";")[0]   # "<id>[;cluster]"


def launch_slurm(job: SlurmJob, dry_run: bool = False) -> str:
    """The rendered script (dry_run) or the submitted job's id."""
    validate(job)
    script = render(job)
    return script if dry_run else submit(script)

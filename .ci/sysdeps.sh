#!/usr/bin/env bash
# Install the system packages fieldtrain needs when they are absent: OpenMPI (mpirun, libmpi for mpi4py), and Slurm
# with munge (tests/test_slurm.py starts a real munged, slurmctld and two slurmd on this machine).
set -euo pipefail
need=()
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
slurm=()
{ command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null 2>&1 || slurm+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || slurm+=(munge)
[ $((${#need[@]} + ${#slurm[@]})) -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]} ${slurm[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" "${slurm[@]}" >/dev/null
  exit 0
fi
if [ ${#slurm[@]} -gt 0 ]; then   # e.g. a login node: sbatch but no slurmctld; the Slurm tests skip, saying why
  echo "note: ${slurm[*]} not installed and not installable here; tests/test_slurm.py will be skipped" >&2
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "fieldtrain needs these system packages: ${need[*]}" >&2
  echo "install them (e.g. 'sudo apt-get install -y ${need[*]}') or load your cluster's MPI module, then rerun" >&2
  exit 1
fi

#!/usr/bin/env bash
# Install the system packages fieldtrain needs when they are absent: OpenMPI (mpirun, libmpi for mpi4py).
set -euo pipefail
need=()
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "fieldtrain needs these system packages: ${need[*]}" >&2
  echo "install them (e.g. 'sudo apt-get install -y ${need[*]}') or load your cluster's MPI module, then rerun" >&2
  exit 1
fi

#!/usr/bin/env bash
# Multi-host GPU run: start this script once per host (e.g. with pdsh, or as a SLURM task).
#
#   COORDINATOR=host0:1234 NUM_HOSTS=2 HOST_ID=0 launch/multi_gpu.sh configs/toy.py /shared/workdir [overrides...]
#
# Under SLURM (srun --ntasks-per-node=1 ...) the three variables may be left out:
# jax.distributed reads them from the SLURM environment (--distributed=auto).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [overrides...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
if [ -n "${COORDINATOR:-}" ]; then
  exec python3 -m ifsq_jax.main --config="$config" --workdir="$workdir" \
    --coordinator_address="$COORDINATOR" --num_processes="$NUM_HOSTS" --process_id="$HOST_ID" "$@"
fi
exec python3 -m ifsq_jax.main --config="$config" --workdir="$workdir" "$@"

#!/usr/bin/env bash
# Train on the GPUs of one host: one process drives all of its GPUs.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu/host.sh [--coordinator=HOST:PORT --num_hosts=N --host_id=I] CONFIG WORKDIR [--config.x=y ...]

Runs `python -m ifsq_jax.main` with the XLA / NCCL settings of launch/gpu/env.sh. One
process sees every local GPU (CUDA_VISIBLE_DEVICES narrows them). Run it from the
repository root, with the environment that has ifsq_jax installed with JAX for CUDA 12
(PYTHON=... picks another interpreter than python3):

  pip install -e ".[cuda]"

The run gets --config.mesh.platform=gpu: where JAX sees no GPU (JAX without the cuda
extra, a GPU that nvidia-smi does not list or CUDA_VISIBLE_DEVICES hides) it stops with
an error before training instead of training on the CPU.

One host runs with --distributed=off, also inside a SLURM allocation of several tasks
(whose variables would otherwise make the run wait for peers that never start).

Several hosts without SLURM: start it once per host, with the same CONFIG, WORKDIR (on
storage every host reads and writes: a shared file system or gs://) and overrides, and
--coordinator (host 0's address and a free port), --num_hosts and --host_id (0..N-1).
Under SLURM use launch/gpu/slurm.sbatch instead.

SIGTERM or Ctrl-C saves a checkpoint and exits; the same command again resumes.
DRY_RUN=1 prints the command instead of running it.

Examples:
  launch/gpu/host.sh configs/dit_l2.py out/dit --config.train.compute_dtype=bfloat16
  launch/gpu/host.sh --coordinator=10.0.0.1:1234 --num_hosts=2 --host_id=0 configs/dit_l2.py /shared/dit
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/../common.sh"
# shellcheck source=launch/gpu/env.sh
source "$here/env.sh"

coordinator="" num_hosts="" host_id=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --help | -h) usage; exit 0 ;;
    --coordinator=*) coordinator=${1#*=} ;;
    --num_hosts=*) num_hosts=${1#*=} ;;
    --host_id=*) host_id=${1#*=} ;;
    *) usage_error "unknown flag '$1' before CONFIG (flags: --coordinator, --num_hosts, --host_id)." ;;
  esac
  shift
done
check_main_args "$@"
config=$1 workdir=$2
shift 2

# One host: no jax.distributed, whatever SLURM_NTASKS or other cluster variables say.
distributed=(--distributed=off)
if [[ -n $coordinator || -n $num_hosts || -n $host_id ]]; then
  if [[ -z $coordinator || -z $num_hosts || -z $host_id ]]; then
    usage_error "--coordinator='$coordinator' --num_hosts='$num_hosts' --host_id='$host_id': give all three or none."
  fi
  if ! [[ $coordinator =~ ^[^:]+:[0-9]+$ ]]; then
    usage_error "--coordinator=$coordinator is not HOST:PORT (e.g. 10.0.0.1:1234)."
  fi
  check_int --num_hosts "$num_hosts" 1
  check_int --host_id "$host_id" 0
  if ((10#$host_id >= 10#$num_hosts)); then
    usage_error "--host_id=$host_id is not valid for --num_hosts=$num_hosts: use 0..$((10#$num_hosts - 1))."
  fi
  if ((10#$num_hosts > 1)); then
    distributed=(--distributed=on --coordinator_address="$coordinator" --num_processes="$num_hosts"
      --process_id="$host_id")
  fi
fi

run_exec env "${gpu_env[@]}" "${PYTHON:-python3}" -m ifsq_jax.main \
  --config="$config" --workdir="$workdir" --config.mesh.platform=gpu "${distributed[@]}" "$@"

#!/usr/bin/env bash
# Run one config on every host of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/toy.py gs://BUCKET/workdir [--config.train.num_steps=...]
#
# The same command starts on all workers; jax.distributed finds its peers through the
# TPU metadata (python -m ifsq_jax.main --distributed=auto). Install once per pod with
# INSTALL=1. A preempted pod resumes from its newest checkpoint when started again.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [overrides...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=${REPO_DIR:-ifsq_jax}
cmd="cd $repo && python3 -m ifsq_jax.main --config=$config --workdir=$workdir --distributed=on $*"
if [ "${INSTALL:-0}" = 1 ]; then
  cmd="cd $repo && pip install -e . 'jax[tpu]' && $cmd"
fi
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$cmd"

#!/usr/bin/env bash
# Cloud TPU VMs, pod slices and multislice: create, set up, run, watch, stop, delete.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu/tpu.sh COMMAND --name=NAME --zone=ZONE [--project=PROJECT] [--queued | --slices=N] [flags]

Commands (give every command the same --name, --zone, --project, --queued / --slices):
  create --accelerator=TYPE [--spot] [--runtime_version=VERSION]
         A TPU VM (gcloud compute tpus tpu-vm create); with --queued or --slices a queued
         resource (gcloud compute tpus queued-resources create), which waits for capacity:
         `status` says when it is ACTIVE.
  setup  [--repo=GIT_URL [--branch=BRANCH]] [--python=3.11]
         On every worker: copy this checkout (its tracked and untracked, not ignored files)
         or clone --repo (a later setup pulls) into ~/ifsq_jax, make ~/ifsq_jax/.venv with
         uv (TPU VM images ship Python 3.10; ifsq_jax needs 3.11+) and
         pip install -e ".[tpu]".
  run    CONFIG WORKDIR [--config.x=y ...]
         python -m ifsq_jax.main on every worker, in the background; each worker appends
         its output to ~/ifsq_jax/run.log. WORKDIR: gs://BUCKET/path (every worker of a
         pod writes the same work dir). Started again in the same WORKDIR, it resumes.
  logs   [--worker=0|N|all] [--lines=100]
         Follow a worker's log (worker 0 prints the progress); Ctrl-C stops following.
  stop   [--timeout_s=600]
         SIGTERM to the training processes: all of them save a checkpoint at the same step
         and exit; waits for that.
  delete The TPU VM or queued resource, with its disks.
  status Describe the TPU VM or queued resource.

Accelerator types and their default --runtime_version:
  v4-N          tpu-ubuntu2204-base
  v5litepod-N   v2-alpha-tpuv5-lite   (TPU v5e)
  v5p-N         v2-alpha-tpuv5
  v6e-N         v2-alpha-tpuv6e

Multislice: --slices=N (N >= 2) on every command makes N slices of the accelerator type,
joined by the data-centre network: a queued resource with N nodes NAME-0..NAME-(N-1); the
TPU runtime gives each worker its MEGASCALE_* settings, and `run` adds
--config.mesh.slices=N so that only the data axis of the mesh spans slices.

Preemption: a spot TPU VM gets a SIGTERM before it is taken away, which stops the run
like `stop` does. It cannot be restarted: delete, create, setup and run the same
command again; the run resumes from the newest checkpoint in WORKDIR.

DRY_RUN=1 prints every command (gcloud, ssh) one per line after "+ " and runs none.

Example:
  T="--name=ifsq-v5e --zone=us-west4-a --queued"
  launch/tpu/tpu.sh create $T --accelerator=v5litepod-16 --spot
  launch/tpu/tpu.sh setup $T
  launch/tpu/tpu.sh run $T configs/dit_l2.py gs://BUCKET/dit --config.train.num_steps=100000
  launch/tpu/tpu.sh logs $T
  launch/tpu/tpu.sh stop $T && launch/tpu/tpu.sh delete $T
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/../common.sh"

commands="create, setup, run, logs, stop, delete or status"
command=${1:-}
case $command in
  create | setup | run | logs | stop | delete | status) shift ;;
  --help | -h | help) usage; exit 0 ;;
  "") usage_error "missing COMMAND: $commands." ;;
  *) usage_error "unknown COMMAND '$command': use $commands." ;;
esac

common_flags="name zone project queued slices"
case $command in
  create) allowed="$common_flags accelerator spot runtime_version" ;;
  setup) allowed="$common_flags repo branch python" ;;
  logs) allowed="$common_flags worker lines" ;;
  stop) allowed="$common_flags timeout_s" ;;
  *) allowed=$common_flags ;;
esac

name="" zone="" project="" queued=0 slices=1
accelerator="" spot=0 runtime_version="" repo="" branch="" python=3.11 worker=0 lines=100 timeout_s=600
while [[ $# -gt 0 && $1 == --* ]]; do
  if [[ $1 == --help || $1 == -h ]]; then
    usage
    exit 0
  fi
  flag=${1%%=*}
  if [[ " $allowed " != *" ${flag#--} "* ]]; then
    usage_error "'$1' is not a flag of '$command' (its flags: --${allowed// / --})."
  fi
  case $1 in
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --slices=*) slices=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --runtime_version=*) runtime_version=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --branch=*) branch=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --worker=*) worker=${1#*=} ;;
    --lines=*) lines=${1#*=} ;;
    --timeout_s=*) timeout_s=${1#*=} ;;
    --queued=* | --spot=*) usage_error "'$1': $flag takes no value." ;;
    *) usage_error "'$1': $flag needs a value ($flag=...)." ;;
  esac
  shift
done
if [[ $command != run && $# -gt 0 ]]; then
  usage_error "unexpected argument '$1' for '$command'."
fi

# GCE resource names: lowercase letters, digits and hyphens, starting with a letter.
if ! [[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
  usage_error "--name='$name' is not a TPU name: lowercase letters, digits and hyphens, starting with a letter."
fi
if ! [[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]]; then
  usage_error "--zone='$zone' is not a zone like us-west4-a (one that has your accelerator type)."
fi
check_int --slices "$slices" 1
if ((10#$slices > 1)); then
  queued=1 # multislice exists only as a queued resource
fi
where=(--zone="$zone")
if [[ -n $project ]]; then
  where+=(--project="$project")
fi
same=(--name="$name" "${where[@]}") # the flags every command for this TPU takes
if ((10#$slices > 1)); then
  same+=(--slices="$slices")
elif ((queued)); then
  same+=(--queued)
fi

# Runs one bash command line on the workers: `all` or worker N (of the first slice).
on_workers() {
  local workers=$1 line=$2
  if ((queued)); then
    local node=0
    if [[ $workers == all ]]; then
      node=all
    fi
    run gcloud compute tpus queued-resources ssh "$name" "${where[@]}" --node="$node" --worker="$workers" \
      --command="$line"
  else
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$workers" --command="$line"
  fi
}

# Copies a local file to the home directory of every worker.
copy_to_workers() {
  if ((queued)); then
    run gcloud compute tpus queued-resources scp "$1" "$name:$2" "${where[@]}" --node=all --worker=all
  else
    run gcloud compute tpus tpu-vm scp "$1" "$name:$2" "${where[@]}" --worker=all
  fi
}

default_runtime() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}

create() {
  if ! [[ $accelerator =~ ^(v4|v5litepod|v5p|v6e)-[1-9][0-9]*$ ]]; then
    local hint=""
    if [[ $accelerator =~ ^v5e-([0-9]+)$ ]]; then
      hint=" (TPU v5e is v5litepod-${BASH_REMATCH[1]})"
    fi
    usage_error "--accelerator='$accelerator' is not a known accelerator type$hint: use v4-N, v5litepod-N, v5p-N or v6e-N (e.g. v4-32, v5litepod-16, v5p-64, v6e-8)."
  fi
  local runtime=${runtime_version:-$(default_runtime "$accelerator")}
  local extra=()
  if ((spot)); then
    extra+=(--spot)
  fi
  if ((queued)); then
    if ((10#$slices > 1)); then
      extra+=(--node-count="$slices" --node-prefix="$name")
    else
      extra+=(--node-id="$name")
    fi
    run gcloud compute tpus queued-resources create "$name" "${where[@]}" --accelerator-type="$accelerator" \
      --runtime-version="$runtime" "${extra[@]}"
    echo "Queued: usable once 'launch/tpu/tpu.sh status $(quote "${same[@]}")' says ACTIVE." >&2
  else
    # ${extra[@]+...}: bash 3.2 (macOS's) calls an empty array unbound under set -u.
    run gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$accelerator" \
      --version="$runtime" ${extra[@]+"${extra[@]}"}
  fi
}

setup() {
  if ! [[ $python =~ ^3\.(1[1-9]|[2-9][0-9])$ ]]; then
    usage_error "--python=$python is not valid: ifsq_jax needs Python 3.11 or newer (e.g. --python=3.12)."
  fi
  if [[ -n $branch && -z $repo ]]; then
    usage_error "--branch=$branch needs --repo=GIT_URL (without it, setup copies this checkout)."
  fi
  local fetch
  if [[ -n $repo ]]; then
    local clone=(git clone)
    if [[ -n $branch ]]; then
      clone+=(--branch="$branch")
    fi
    fetch="if [ -d ifsq_jax/.git ]; then git -C ifsq_jax pull --ff-only; else $(quote "${clone[@]}" "$repo" ifsq_jax); fi"
  else
    local checkout archive
    checkout=$(cd "$here/../.." && pwd)
    archive="${TMPDIR:-/tmp}/ifsq_jax-$name.tar.gz"
    # Files git tracks or would track, less those deleted from the working tree.
    # shellcheck disable=SC2016  # the single-quoted $ are for the pipeline's bash
    run_pipeline "cd $(quote "$checkout") && git ls-files -z --cached --others --exclude-standard | "'while IFS= read -r -d "" f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done'" | tar -czf $(quote "$archive") --null -T -"
    copy_to_workers "$archive" ifsq_jax.tar.gz
    run rm -f "$archive"
    fetch="mkdir -p ifsq_jax && tar -xzf ifsq_jax.tar.gz -C ifsq_jax && rm ifsq_jax.tar.gz"
  fi
  # uv brings its own Python build, so the image's Python version does not matter.
  on_workers all "$fetch && python3 -m pip install --user --quiet --upgrade uv && cd ifsq_jax && ~/.local/bin/uv venv --allow-existing --python=$python .venv && ~/.local/bin/uv pip install --python=.venv/bin/python -e '.[tpu]'"
}

start() {
  check_main_args "$@"
  local config=$1 workdir=$2
  shift 2
  if [[ $workdir != gs://* ]]; then
    echo "Warning: WORKDIR '$workdir' is on each worker's own disk; every worker of a pod must write the same work dir: use gs://BUCKET/path." >&2
  fi
  # --distributed=on: a TPU VM's peers are listed by the metadata server, not in the
  # environment that --distributed=auto looks at; jax.distributed asks the metadata
  # server (and, on multislice, reads the MEGASCALE_* settings the runtime provides).
  local args=(--config="$config" --workdir="$workdir" --distributed=on)
  if ((10#$slices > 1)); then
    args+=(--config.mesh.slices="$slices")
  fi
  # shellcheck disable=SC2016  # the single-quoted $ are for the workers' shell
  local line='cd ifsq_jax || exit 1; if [ -f run.pid ] && kill -0 "$(cat run.pid)" 2>/dev/null; then echo "$(hostname): already running; stop it first" >&2; exit 1; fi; '
  line+="nohup .venv/bin/python -m ifsq_jax.main $(quote "${args[@]}" "$@") >> run.log 2>&1 < /dev/null & "
  # shellcheck disable=SC2016
  line+='echo $! > run.pid; echo "$(hostname): started; log: ~/ifsq_jax/run.log"'
  on_workers all "$line"
}

logs() {
  if ! [[ $worker == all || $worker =~ ^[0-9]+$ ]]; then
    usage_error "--worker=$worker is not valid: use a worker number (0 prints the progress) or all."
  fi
  check_int --lines "$lines" 0
  on_workers "$worker" "tail -n $lines -F ifsq_jax/run.log | sed -u \"s/^/\$(hostname): /\""
}

stop() {
  check_int --timeout_s "$timeout_s" 1
  # shellcheck disable=SC2016
  local line='cd ifsq_jax || exit 1; pid=$(cat run.pid 2>/dev/null); if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then echo "$(hostname): not running"; exit 0; fi; kill -TERM "$pid"; '
  line+="for _ in \$(seq $timeout_s); do "
  # shellcheck disable=SC2016
  line+='kill -0 "$pid" 2>/dev/null || { echo "$(hostname): stopped"; exit 0; }; sleep 1; done; '
  line+="echo \"\$(hostname): still running after $timeout_s s\" >&2; exit 1"
  on_workers all "$line"
}

delete() {
  if ((queued)); then
    # --force also deletes the TPU VMs of the queued resource.
    run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

status() {
  if ((queued)); then
    run gcloud compute tpus queued-resources describe "$name" "${where[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$name" "${where[@]}"
  fi
}

case $command in
  run) start "$@" ;;
  *) "$command" ;;
esac

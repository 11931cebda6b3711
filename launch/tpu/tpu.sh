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
  setup  [--repo=GIT_URL [--branch=BRANCH]] [--python=3.11] [--mount=BUCKET[/PATH]:/mnt/DIR ...]
         On every worker: copy this checkout (its tracked and untracked, not ignored files)
         or clone --repo (a later setup pulls) into ~/ifsq_jax, make ~/ifsq_jax/.venv with
         uv (TPU VM images ship Python 3.10; ifsq_jax needs 3.11+) and
         pip install -e ".[tpu]".
         --mount (repeatable): install gcsfuse if absent and mount gs://BUCKET[/PATH]
         read-only at /mnt/DIR on every worker. tfds array_record files are read at
         random offsets, which the reader cannot do on gs:// directly: copy the prepared
         dataset to a bucket and give the run a data_dir on the mount, e.g.
         setup --mount=my-data:/mnt/data, then run ... --config.data.data_dir=/mnt/data/tfds.
  run    CONFIG WORKDIR [--config.x=y ...]
         python -m ifsq_jax.main on every worker, in the background; each worker appends
         its output to ~/ifsq_jax/run.log. WORKDIR: gs://BUCKET/path (every worker of a
         pod writes the same work dir). Started again in the same WORKDIR, it resumes.
  run    --until-done --accelerator=TYPE [--spot] [--runtime_version=VERSION]
         [--repo=GIT_URL [--branch=BRANCH]] [--python=3.11] [--mount=...]
         [--max_restarts=20] [--poll_s=60] CONFIG gs://BUCKET/path [--config.x=y ...]
         Supervised: starts the run as `run` does, then stays in the foreground and every
         --poll_s seconds asks gcloud for the TPU's state and worker 0 whether the run is
         still going (~/ifsq_jax/run.exit holds its exit status once it ends). When the TPU
         is preempted (PREEMPTED, SUSPENDED, FAILED, gone, or the run stopped by a SIGTERM
         to its host), it deletes what is left, creates it again with the create flags
         given here, waits for READY / ACTIVE, runs setup with the setup flags given here,
         and starts the same command, which resumes from the checkpoints in WORKDIR (so
         WORKDIR must be on gs://). Exits 0 when the run exits 0, with the run's exit
         status when it fails on a TPU that was not preempted (no retry), and 1 after
         --max_restarts recreations. Given a TPU that does not exist, it creates one first;
         started again while its run is going, it follows that run. Ctrl-C stops only the
         supervisor; then `stop` stops the run (a run stopped that way exits 0 and ends the
         supervision).
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
command again; the run resumes from the newest checkpoint in WORKDIR. `run --until-done`
does all of that for you, as often as it takes.

DRY_RUN=1 prints every command (gcloud, ssh) one per line after "+ " and runs none.

Example:
  T="--name=ifsq-v5e --zone=us-west4-a --queued"
  launch/tpu/tpu.sh create $T --accelerator=v5litepod-16 --spot
  launch/tpu/tpu.sh setup $T
  launch/tpu/tpu.sh run $T configs/dit_l2.py gs://BUCKET/dit --config.train.num_steps=100000
  launch/tpu/tpu.sh logs $T
  launch/tpu/tpu.sh stop $T && launch/tpu/tpu.sh delete $T
  # The same run, brought back after every preemption, with its data on a gcsfuse mount:
  launch/tpu/tpu.sh run --until-done $T --accelerator=v5litepod-16 --spot --mount=my-data:/mnt/data \
    configs/dit_l2.py gs://BUCKET/dit --config.data.data_dir=/mnt/data/tfds
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

# `run --until-done` recreates the TPU and sets it up again: it takes the flags of both.
until_done=0 leading=1
if [[ $command == run ]]; then
  for arg in "$@"; do
    if [[ $arg != --* ]]; then
      leading=0
    elif [[ $arg == --until-done ]]; then
      if ((!leading)); then
        usage_error "'--until-done' goes before CONFIG WORKDIR (after them come the run's --config.x=y flags)."
      fi
      until_done=1
    fi
  done
fi
common_flags="name zone project queued slices"
create_flags="accelerator spot runtime_version"
setup_flags="repo branch python mount"
supervisor_flags="until-done max_restarts poll_s $create_flags $setup_flags"
case $command in
  create) allowed="$common_flags $create_flags" ;;
  setup) allowed="$common_flags $setup_flags" ;;
  run) allowed="$common_flags until-done" ;;
  logs) allowed="$common_flags worker lines" ;;
  stop) allowed="$common_flags timeout_s" ;;
  *) allowed=$common_flags ;;
esac
if ((until_done)); then
  allowed="$common_flags $supervisor_flags"
fi

name="" zone="" project="" queued=0 slices=1
accelerator="" spot=0 runtime_version="" repo="" branch="" python=3.11 worker=0 lines=100 timeout_s=600
mounts=() max_restarts=20 poll_s=60
while [[ $# -gt 0 && $1 == --* ]]; do
  if [[ $1 == --help || $1 == -h ]]; then
    usage
    exit 0
  fi
  flag=${1%%=*}
  if [[ " $allowed " != *" ${flag#--} "* ]]; then
    hint=""
    if [[ $command == run && " $supervisor_flags " == *" ${flag#--} "* ]]; then
      hint=" without --until-done"
    fi
    usage_error "'$1' is not a flag of '$command'$hint (its flags: --${allowed// / --})."
  fi
  case $1 in
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --until-done) ;; # read above
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
    --mount=*) mounts+=("${1#*=}") ;;
    --max_restarts=*) max_restarts=${1#*=} ;;
    --poll_s=*) poll_s=${1#*=} ;;
    --queued=* | --spot=* | --until-done=*) usage_error "'$1': $flag takes no value." ;;
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

check_accelerator() {
  if ! [[ $accelerator =~ ^(v4|v5litepod|v5p|v6e)-[1-9][0-9]*$ ]]; then
    local hint=""
    if [[ $accelerator =~ ^v5e-([0-9]+)$ ]]; then
      hint=" (TPU v5e is v5litepod-${BASH_REMATCH[1]})"
    fi
    usage_error "--accelerator='$accelerator' is not a known accelerator type$hint: use v4-N, v5litepod-N, v5p-N or v6e-N (e.g. v4-32, v5litepod-16, v5p-64, v6e-8)."
  fi
}

create() {
  check_accelerator
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

# Splits --mount=[gs://]BUCKET[/PATH]:/MOUNT/POINT into mount_bucket, mount_path and mount_point.
parse_mount() {
  local spec=${1#gs://} source
  mount_bucket="" mount_path="" mount_point=${spec#*:}
  source=${spec%%:*}
  mount_bucket=${source%%/*}
  if [[ $source == */* ]]; then
    mount_path=${source#*/}
    mount_path=${mount_path%/}
  fi
  if [[ $spec != *:* || ! $mount_bucket =~ ^[a-z0-9][-a-z0-9_.]*[a-z0-9]$ ||
    ! $mount_point =~ ^/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]]; then
    usage_error "--mount='$1' is not valid: use --mount=BUCKET[/PATH]:/mnt/DIR (e.g. --mount=my-data:/mnt/data; PATH: a folder of the bucket; /mnt/DIR: an absolute path)."
  fi
}

check_setup_args() {
  if ! [[ $python =~ ^3\.(1[1-9]|[2-9][0-9])$ ]]; then
    usage_error "--python=$python is not valid: ifsq_jax needs Python 3.11 or newer (e.g. --python=3.12)."
  fi
  if [[ -n $branch && -z $repo ]]; then
    usage_error "--branch=$branch needs --repo=GIT_URL (without it, setup copies this checkout)."
  fi
  local spec
  for spec in ${mounts[@]+"${mounts[@]}"}; do
    parse_mount "$spec"
  done
}

# The workers' command line that installs gcsfuse where it is missing and mounts every --mount read-only.
mount_line() {
  # shellcheck disable=SC2016  # the single-quoted $ are for the workers' shell
  local line='if ! command -v gcsfuse > /dev/null 2>&1; then curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null && echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(. /etc/os-release && echo "$VERSION_CODENAME") main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null && sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; fi'
  local spec point gcsfuse
  for spec in "${mounts[@]}"; do
    parse_mount "$spec"
    point=$(quote "$mount_point")
    # --implicit-dirs: buckets filled by `gcloud storage cp -r` hold no folder objects.
    gcsfuse=(gcsfuse -o ro --implicit-dirs)
    if [[ -n $mount_path ]]; then
      gcsfuse+=(--only-dir="$mount_path")
    fi
    # shellcheck disable=SC2016
    line+=" && { mountpoint -q $point || { sudo mkdir -p $point && sudo chown \"\$(id -u):\$(id -g)\" $point && $(quote "${gcsfuse[@]}" "$mount_bucket" "$mount_point"); }; }"
  done
  echo "$line"
}

setup() {
  check_setup_args
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
  if [[ -n ${mounts[*]+set} ]]; then
    on_workers all "$(mount_line)"
  fi
}

# Sets main_args to the arguments of python -m ifsq_jax.main for CONFIG WORKDIR [--config.x=y ...].
python_args() {
  check_main_args "$@"
  local config=$1 workdir=$2
  shift 2
  if [[ $workdir != gs://* ]]; then
    echo "Warning: WORKDIR '$workdir' is on each worker's own disk; every worker of a pod must write the same work dir: use gs://BUCKET/path." >&2
  fi
  # --distributed=on: a TPU VM's peers are listed by the metadata server, not in the
  # environment that --distributed=auto looks at; jax.distributed asks the metadata
  # server (and, on multislice, reads the MEGASCALE_* settings the runtime provides).
  main_args=(--config="$config" --workdir="$workdir" --distributed=on)
  if ((10#$slices > 1)); then
    main_args+=(--config.mesh.slices="$slices")
  fi
  main_args+=("$@")
}

start() {
  python_args "$@"
  # shellcheck disable=SC2016  # the single-quoted $ are for the workers' shell
  local line='cd ifsq_jax || exit 1; if [ -f run.pid ] && kill -0 "$(cat run.pid)" 2>/dev/null; then echo "$(hostname): already running; stop it first" >&2; exit 1; fi; '
  line+="nohup .venv/bin/python -m ifsq_jax.main $(quote "${main_args[@]}") >> run.log 2>&1 < /dev/null & "
  # shellcheck disable=SC2016
  line+='echo $! > run.pid; echo "$(hostname): started; log: ~/ifsq_jax/run.log"'
  on_workers all "$line"
}

# --- run --until-done: the supervisor -------------------------------------------------
#
# On each worker a supervised run is a small bash wrapper around python -m ifsq_jax.main
# (its pid in ~/ifsq_jax/run.wrapper.pid). The wrapper puts the program's pid in run.pid,
# so that `stop` and `logs` work as for `run`, and when the program ends writes its exit
# status to run.exit, followed by " TERM" if the wrapper itself got a SIGTERM meanwhile:
# then the whole host was being shut down (a spot TPU's preemption notice reaches every
# process), and the run's exit status 0 (a checkpoint saved at the notice) means
# "preempted", not "done". The wrapper is alive until run.exit is written, so a probe
# that finds it gone and then no run.exit knows that the run was lost (e.g. a rebooted host).

# shellcheck disable=SC2016  # for the workers' bash
wrapper='unset got; trap "got=TERM" TERM; "$@" & pid=$!; echo "$pid" > run.pid; while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done; wait "$pid"; status=$?; echo "$status${got:+ $got}" > run.exit.tmp && mv run.exit.tmp run.exit'

# shellcheck disable=SC2016
probe='cd ifsq_jax 2>/dev/null || { echo "run-state: none"; exit 0; }; if [ ! -f run.exit ] && [ -f run.wrapper.pid ] && kill -0 "$(cat run.wrapper.pid)" 2>/dev/null; then echo "run-state: running"; elif [ -f run.exit ]; then echo "run-state: exited $(cat run.exit)"; else echo "run-state: none"; fi'

# Starts the supervised run on every worker; a worker whose supervised run is still going
# keeps it (a supervisor started again follows the run it finds).
start_supervised() {
  # shellcheck disable=SC2016
  local line='cd ifsq_jax || exit 1; if [ -f run.wrapper.pid ] && kill -0 "$(cat run.wrapper.pid)" 2>/dev/null; then echo "$(hostname): a supervised run is going: following it"; exit 0; fi; if [ -f run.pid ] && kill -0 "$(cat run.pid)" 2>/dev/null; then echo "$(hostname): already running; stop it first" >&2; exit 1; fi; rm -f run.exit; '
  line+="nohup $(quote bash -c "$wrapper" ifsq_jax-run .venv/bin/python -m ifsq_jax.main "${main_args[@]}") >> run.log 2>&1 < /dev/null & "
  # shellcheck disable=SC2016
  line+='echo $! > run.wrapper.pid; echo "$(hostname): started; log: ~/ifsq_jax/run.log"'
  on_workers all "$line"
}

# Sets tpu_state to the state of the TPU VM or queued resource (READY, ACTIVE, PREEMPTED,
# SUSPENDED, ...), NOT_FOUND when there is none, "" when gcloud could not say.
get_tpu_state() {
  local kind=tpu-vm format='value(state)'
  if ((queued)); then
    kind=queued-resources format='value(state.state)'
  fi
  local query=(gcloud compute tpus "$kind" describe "$name" "${where[@]}" --format="$format")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    run "${query[@]}"
    tpu_state=READY
    return 0
  fi
  local err out rc=0
  err=$(mktemp "${TMPDIR:-/tmp}/tpu-state.XXXXXX")
  out=$(run "${query[@]}" 2>"$err") || rc=$?
  cat "$err" >&2 # run's echo of the command, and gcloud's messages
  tpu_state=$(echo "$out" | tr -d '[:space:]')
  if ((rc != 0)); then
    tpu_state=""
    if grep -q -e NOT_FOUND -e 'was not found' "$err"; then
      tpu_state=NOT_FOUND
    fi
  fi
  rm -f "$err"
}

# Sets run_state to what worker 0 says of the supervised run: running, "exited STATUS",
# "exited STATUS TERM" or none; "" when it could not be asked.
get_run_state() {
  run_state=""
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    on_workers 0 "$probe"
    return 0
  fi
  local out line
  if out=$(on_workers 0 "$probe"); then
    while IFS= read -r line; do
      case $line in
        *"run-state: "*) run_state=${line##*run-state: } ;; # gcloud may put a worker's name before it
      esac
    done <<<"$out"
  fi
}

say() {
  echo "$(basename "$0") $(date '+%Y-%m-%d %H:%M:%S'): $*" >&2
}

supervise() {
  check_main_args "$@"
  if [[ $2 != gs://* ]]; then
    usage_error "--until-done needs WORKDIR on gs:// (got '$2'): a recreated TPU starts with empty disks, and the run resumes from the checkpoints in WORKDIR (use gs://BUCKET/path)."
  fi
  check_accelerator
  check_setup_args
  check_int --max_restarts "$max_restarts" 0
  check_int --poll_s "$poll_s" 0
  python_args "$@"
  # What recreates the TPU and sets it up again: this script's own create and setup, with the
  # flags given to this command.
  local self recreate=(--accelerator="$accelerator") prepare=(--python="$python") spec
  self="$here/$(basename "${BASH_SOURCE[0]}")"
  if ((spot)); then
    recreate+=(--spot)
  fi
  if [[ -n $runtime_version ]]; then
    recreate+=(--runtime_version="$runtime_version")
  fi
  if [[ -n $repo ]]; then
    prepare+=(--repo="$repo")
  fi
  if [[ -n $branch ]]; then
    prepare+=(--branch="$branch")
  fi
  for spec in ${mounts[@]+"${mounts[@]}"}; do
    prepare+=(--mount="$spec")
  done

  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "DRY_RUN: the start, one poll (state, run), then what a preempted TPU gets: delete, create, wait for it, setup, start." >&2
    start_supervised
    get_tpu_state
    get_run_state
    bash "$self" delete "${same[@]}"
    bash "$self" create "${same[@]}" "${recreate[@]}"
    get_tpu_state
    bash "$self" setup "${same[@]}" "${prepare[@]}"
    start_supervised
    return 0
  fi

  # lost: why the TPU is to be recreated; unsure: polls in a row without an answer;
  # failures: setup or start failing in a row on a TPU that is up; ended: an exit status
  # seen once, believed when the next poll sees it again with the TPU still up.
  local restarts=0 needs_setup=0 needs_start=1 lost="" unsure=0 failures=0 ended="" up status
  say "supervising $(quote "${main_args[@]}") on $name (poll every ${poll_s}s, at most $max_restarts recreations)."
  while true; do
    up=0
    if [[ -z $lost ]]; then
      get_tpu_state
      case $tpu_state in
        READY | ACTIVE) up=1 ;;
        CREATING | STARTING | RESTARTING | REPAIRING | REIMAGING | UNHIDING | ACCEPTED | WAITING_FOR_RESOURCES | \
          PROVISIONING | DELETING)
          say "the TPU is $tpu_state: waiting."
          ;;
        PREEMPTED | TERMINATED | STOPPING | STOPPED | HIDING | HIDDEN | SUSPENDING | SUSPENDED | FAILED | NOT_FOUND)
          lost="the TPU is $tpu_state"
          ;;
        *)
          unsure=$((unsure + 1))
          say "no usable state of the TPU ('$tpu_state'; $unsure polls in a row)."
          ;;
      esac
    fi
    if ((unsure >= 10)); then
      lost="no answer from the TPU or its run for $unsure polls in a row"
    fi

    if [[ -n $lost ]]; then
      if ((restarts >= max_restarts)); then
        say "$lost, and it was recreated $restarts times already (--max_restarts=$max_restarts): giving up. The checkpoints are in ${main_args[1]#--workdir=}; what is left of the TPU is not deleted."
        exit 1
      fi
      restarts=$((restarts + 1))
      say "$lost: deleting what is left and creating it again (recreation $restarts of at most $max_restarts)."
      bash "$self" delete "${same[@]}" || true # there may be nothing left to delete
      if ! bash "$self" create "${same[@]}" "${recreate[@]}"; then
        say "create failed; asking again in ${poll_s}s."
        sleep "$poll_s"
      fi
      lost="" needs_setup=1 needs_start=1 unsure=0 failures=0 ended=""
      continue
    fi
    if ((!up)); then
      sleep "$poll_s"
      continue
    fi

    # The TPU is up: set it up and start the run where that is still to do, then ask the run.
    if ((needs_setup)); then
      if bash "$self" setup "${same[@]}" "${prepare[@]}"; then
        needs_setup=0 failures=0
      else
        failures=$((failures + 1))
      fi
    fi
    if ((!needs_setup && needs_start)); then
      if start_supervised; then
        needs_start=0 failures=0 ended=""
      else
        failures=$((failures + 1))
      fi
    fi
    if ((needs_setup || needs_start)); then
      if ((failures >= 3)); then
        say "setting up or starting the run failed $failures times in a row on a TPU that is up: stopping (has setup run on it? Fix it, then start this command again)."
        exit 1
      fi
      say "setting up or starting the run failed; trying again in ${poll_s}s."
      sleep "$poll_s"
      continue
    fi

    get_run_state
    case $run_state in
      running)
        unsure=0 ended=""
        ;;
      "exited "*" TERM")
        lost="the run stopped at a SIGTERM to its host (${run_state#exited }: a preemption notice)"
        continue
        ;;
      "exited "*)
        unsure=0
        status=${run_state#exited }
        if [[ $ended != "$status" ]]; then
          # A preempted slice can end the run on the others before its TPU's state says so:
          # the next poll sees the TPU's state again.
          ended=$status
          say "the run exited $status on worker 0: checking the TPU once more in ${poll_s}s."
        elif [[ $status == 0 ]]; then
          say "the run exited 0: done (the TPU was recreated $restarts times). The TPU is still up: launch/tpu/tpu.sh delete $(quote "${same[@]}")"
          exit 0
        else
          say "the run failed with exit status $status on a TPU that was not preempted: not restarting it. Its log: launch/tpu/tpu.sh logs $(quote "${same[@]}")"
          if ! [[ $status =~ ^[0-9]+$ ]] || ((status < 1 || status > 255)); then
            status=1
          fi
          exit "$status"
        fi
        ;;
      none)
        lost="the run is gone from worker 0 with no exit status (the host restarted?)"
        continue
        ;;
      *)
        unsure=$((unsure + 1))
        say "no answer from worker 0 about the run ($unsure polls in a row)."
        ;;
    esac
    sleep "$poll_s"
  done
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
  run)
    if ((until_done)); then
      supervise "$@"
    else
      start "$@"
    fi
    ;;
  *) "$command" ;;
esac

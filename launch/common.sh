# shellcheck shell=bash
# Helpers sourced by the launch scripts: the dry run, quoting, argument checks.
#
# DRY_RUN=1 prints every command a script would run, one per line after "+ ", on
# stdout, and runs none of them. Without it each command is echoed the same way on
# stderr just before it runs, so a log shows exactly what was run.

case "${DRY_RUN:-0}" in
  0 | 1) ;;
  *)
    echo "DRY_RUN=${DRY_RUN} is not valid: use DRY_RUN=1 (print the commands, run nothing) or DRY_RUN=0." >&2
    exit 2
    ;;
esac

# Prints its arguments as one line of bash: words made only of safe characters as
# they are, the others in single quotes (after the "--flag=" or "NAME=" that starts
# them, for legibility), so the line can be pasted or parsed back.
quote() {
  local out=() word head
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$word")
      continue
    fi
    head=""
    if [[ $word =~ ^(--?[A-Za-z0-9_.-]+=|[A-Za-z_][A-Za-z0-9_]*=) ]]; then
      head=${BASH_REMATCH[1]}
      word=${word#"$head"}
    fi
    out+=("$head'${word//\'/\'\\\'\'}'")
  done
  echo "${out[*]}"
}

# Runs a command (DRY_RUN=1: prints it).
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# Replaces the shell with a command, so that signals (SIGTERM: save and stop) reach
# it directly (DRY_RUN=1: prints it).
run_exec() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    exec "$@"
  fi
}

# Runs one line of bash, for a pipeline (DRY_RUN=1: prints it).
run_pipeline() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "+ $1"
  else
    echo "+ $1" >&2
    bash -o pipefail -c "$1"
  fi
}

# Exits 2 with a message naming the bad value, and where to read the usage.
usage_error() {
  echo "$(basename "$0"): $*" >&2
  echo "Run '$0 --help' for the usage." >&2
  exit 2
}

# Checks the arguments of python -m ifsq_jax.main: CONFIG WORKDIR [--flag=value ...].
check_main_args() {
  if [[ $# -lt 2 ]]; then
    usage_error "missing CONFIG and WORKDIR (got ${#}: ${*:-nothing})."
  fi
  local config=$1 workdir=$2
  shift 2
  if [[ ${config%%:*} != *.py ]]; then
    usage_error "CONFIG '$config' is not a config file: use configs/<name>.py or configs/<name>.py:variant."
  fi
  if [[ -z $workdir || $workdir == -* ]]; then
    usage_error "WORKDIR '$workdir' is not a directory: use a path or gs://BUCKET/path."
  fi
  local arg
  for arg in "$@"; do
    if [[ $arg != --* ]]; then
      usage_error "'$arg' after CONFIG and WORKDIR is not a flag: overrides look like --config.train.num_steps=1000."
    fi
  done
}

# Checks that $2 is a whole number >= $3; $1 names it in the message.
check_int() {
  if ! [[ $2 =~ ^[0-9]+$ ]] || ((10#$2 < $3)); then
    usage_error "$1=$2 is not valid: use a whole number >= $3."
  fi
}

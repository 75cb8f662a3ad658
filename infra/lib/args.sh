# shellcheck shell=bash disable=SC2034  # the variables set here are read by the launchers
# Option parsing shared by infra/launch_tpu_vm.sh and infra/launch_slurm.sh (sourced, not run).
#
# Both launchers take the same training options and pass the same trainer command on:
#   --gin FILE, -b/--gin_bindings B, --gin.KEY=VALUE, bare bindings, bindings after --,
#   --workdir DIR, --run-id ID, --wandb-mode/--wandb-project/--wandb-entity, --env NAME=VALUE,
#   --dry-run, -h/--help, and --opt=value for every option that takes a value.
# A launcher defines `log` and `usage`, sets its defaults (the variables below), defines
# `launcher_option` for its own options, then calls `parse_args "$@"`, `check_gin REPO`,
# `check_run_id PREFIX`, `check_env` and `make_trainer_args`.
#
# launcher_option OPTION [ARG...] sees the remaining arguments, starting at an option
# parse_args does not know. It sets ARGS_USED to how many it consumed (1 for a flag, 2 for an
# option with a value; `need_arg "$1" $#` checks the value is there) or leaves it 0 for an
# unknown option.

# Set by parse_args; a launcher may give defaults after sourcing this file (e.g. RUN_ID from the
# environment). WANDB_*_ are the launcher's values for the trainer's WANDB_* variables.
GIN="" WORKDIR="" RUN_ID="" DRY_RUN=0 WANDB_MODE_="" WANDB_PROJECT_="" WANDB_ENTITY_=""
BINDINGS=() USER_ENV=() TRAINER_ARGS=() ARGS_USED=0 GIN_REL=""

usage_error() { # a bad command line: exit 2, the trainer's own code for usage errors
  log "ERROR: $*"
  exit 2
}

need_arg() { (($2 >= 2)) || usage_error "option $1 needs a value"; }

# Quote one word for a POSIX shell; words of safe characters are left bare.
shquote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
shjoin() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(shquote "$a")"; done
  printf '%s' "$out"
}

parse_args() {
  local opt val
  while (($#)); do
    case $1 in
      -h | --help)
        usage
        exit 0
        ;;
      --gin.*=*) BINDINGS+=("${1#--gin.}") ;; # the trainer's short form --gin.KEY=VALUE
      --*=*) # --opt=value -> --opt value (the value is never split again)
        opt=${1%%=*} val=${1#*=}
        shift
        set -- "$opt" "$val" "$@"
        continue
        ;;
      --gin) need_arg "$1" $# && GIN=$2 && shift ;;
      -b | --gin_bindings | --gin-bindings) need_arg "$1" $# && BINDINGS+=("$2") && shift ;;
      --workdir) need_arg "$1" $# && WORKDIR=$2 && shift ;;
      --run-id | --run_id) need_arg "$1" $# && RUN_ID=$2 && shift ;;
      --wandb-mode) need_arg "$1" $# && WANDB_MODE_=$2 && shift ;;
      --wandb-project) need_arg "$1" $# && WANDB_PROJECT_=$2 && shift ;;
      --wandb-entity) need_arg "$1" $# && WANDB_ENTITY_=$2 && shift ;;
      --env) need_arg "$1" $# && USER_ENV+=("$2") && shift ;;
      --dry-run) DRY_RUN=1 ;;
      --)
        shift
        BINDINGS+=("$@")
        break
        ;;
      -*)
        ARGS_USED=0
        launcher_option "$@"
        ((ARGS_USED > 0)) ||
          usage_error "unknown option '$1' (bindings that start with '-' go after --); see --help"
        shift "$ARGS_USED"
        continue
        ;;
      *) BINDINGS+=("$1") ;;
    esac
    shift
  done
}

# check_gin REPO: the gin file exists inside REPO; sets GIN_REL (its path relative to REPO).
check_gin() {
  local repo=$1 abs b
  [[ $GIN ]] || usage_error "--gin FILE is required (e.g. --gin gin/joint.gin)"
  [[ -f $GIN ]] || usage_error "gin file '$GIN' does not exist"
  abs=$(cd "$(dirname "$GIN")" && pwd)/$(basename "$GIN")
  [[ $abs == "$repo"/* ]] || usage_error "gin file '$GIN' is not inside the repo $repo"
  GIN_REL=${abs#"$repo"/}
  for b in "${BINDINGS[@]}"; do
    [[ $b =~ [^[:space:]] ]] || usage_error "empty gin binding"
  done
}

# check_run_id PREFIX: default PREFIX-UTCDATE-TIME; the id names the W&B run and the log folders.
check_run_id() {
  [[ $RUN_ID ]] || RUN_ID=$1-$(date -u +%Y%m%d-%H%M%S)
  [[ $RUN_ID =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] ||
    usage_error "bad --run-id '$RUN_ID' (letters, digits, . _ -; at most 64, as the trainer)"
}

check_env() {
  local kv
  for kv in "${USER_ENV[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "bad --env '$kv' (want NAME=VALUE)"
  done
  case ${WANDB_MODE_:-online} in online | offline | disabled) ;;
    *) usage_error "--wandb-mode must be online, offline or disabled" ;;
  esac
}

# The trainer's command line after `python -m jcdm` (the contract in docs/operations.md).
make_trainer_args() {
  local b
  TRAINER_ARGS=(--gin "$GIN_REL" --workdir "$WORKDIR" --run_id "$RUN_ID")
  for b in "${BINDINGS[@]}"; do TRAINER_ARGS+=(--gin_bindings "$b"); done
}

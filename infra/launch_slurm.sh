#!/usr/bin/env bash
# Submit jcdm to a SLURM GPU cluster (run from a login node, inside a checkout on a shared
# filesystem with `pip install -e '.[cuda]'` done in .venv or $JCDM_VENV):
#
#   infra/launch_slurm.sh --gin gin/joint.gin --workdir /shared/jcdm/runs/ID --nodes 2 \
#       --gpus-per-node 8 [--per-gpu] [options] [GIN_BINDING...] [-- GIN_BINDING...]
#
# Submits infra/slurm/jcdm.sbatch, which starts one JAX process per node (or per GPU with
# --per-gpu) through srun with jax.distributed settings, and requeues the job itself when the
# trainer exits 75 (preempted after a checkpoint) or crashes (bounded); see infra/RUNBOOK.md.
set -euo pipefail

INFRA_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$INFRA_DIR/.." && pwd)

usage() {
  cat <<'EOF'
Usage: infra/launch_slurm.sh --gin FILE --workdir DIR|gs://... [options] [GIN_BINDING...]
  --gin FILE              gin config inside this repo (required)
  -b, --gin_bindings B    a gin binding, repeatable (bare arguments, --gin.K=V, args after --)
  --workdir DIR           absolute path on a filesystem shared by all nodes, or gs://BUCKET/...
  --run-id ID             default slurm-UTCDATE-TIME; reuse it (and the workdir) to resume
  --nodes N               default 1
  --gpus-per-node G       default 8
  --per-gpu               one process per GPU (default: one process per node, seeing all GPUs)
  --partition P  --account A  --qos Q  --time T (e.g. 24:00:00)
  --sbatch-flag FLAG      extra sbatch flag, repeatable (e.g. --sbatch-flag=--exclusive)
  --wandb-mode M  --wandb-project P  --wandb-entity E   (default from the environment)
  --env NAME=VALUE        extra environment for the trainer, repeatable
  --dry-run               print the sbatch command instead of running it
EOF
}

log() { printf '[launch-slurm] %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 2
}
need_arg() { (($2 >= 2)) || die "option $1 needs a value"; }
shquote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
shjoin() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(shquote "$a")"; done
  printf '%s' "$out"
}

GIN="" WORKDIR="" RUN_ID="" NODES=1 GPUS=8 LAYOUT=node DRY_RUN=0
BINDINGS=() SBATCH_EXTRA=() USER_ENV=()
while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --gin.*=*) BINDINGS+=("${1#--gin.}") ;; # the trainer's short form --gin.KEY=VALUE
    --*=*)
      opt=${1%%=*} val=${1#*=}
      shift
      set -- "$opt" "$val" "$@"
      continue
      ;;
    --gin) need_arg "$1" $# && GIN=$2 && shift ;;
    -b | --gin_bindings | --gin-bindings) need_arg "$1" $# && BINDINGS+=("$2") && shift ;;
    --workdir) need_arg "$1" $# && WORKDIR=$2 && shift ;;
    --run-id | --run_id) need_arg "$1" $# && RUN_ID=$2 && shift ;;
    --nodes) need_arg "$1" $# && NODES=$2 && shift ;;
    --gpus-per-node) need_arg "$1" $# && GPUS=$2 && shift ;;
    --per-gpu) LAYOUT=gpu ;;
    --per-node) LAYOUT=node ;;
    --partition | --account | --qos | --time)
      need_arg "$1" $# && SBATCH_EXTRA+=("$1=$2") && shift
      ;;
    --sbatch-flag) need_arg "$1" $# && SBATCH_EXTRA+=("$2") && shift ;;
    --wandb-mode) need_arg "$1" $# && export WANDB_MODE=$2 && shift ;;
    --wandb-project) need_arg "$1" $# && export WANDB_PROJECT=$2 && shift ;;
    --wandb-entity) need_arg "$1" $# && export WANDB_ENTITY=$2 && shift ;;
    --env) need_arg "$1" $# && USER_ENV+=("$2") && shift ;;
    --dry-run) DRY_RUN=1 ;;
    --)
      shift
      BINDINGS+=("$@")
      break
      ;;
    -*) die "unknown option '$1' (bindings that start with '-' go after --)" ;;
    *) BINDINGS+=("$1") ;;
  esac
  shift
done

[[ $GIN ]] || die "--gin FILE is required"
[[ -f $GIN ]] || die "gin file '$GIN' does not exist"
GIN_ABS=$(cd "$(dirname "$GIN")" && pwd)/$(basename "$GIN")
[[ $GIN_ABS == "$REPO"/* ]] || die "gin file '$GIN' is not inside the repo $REPO"
GIN_REL=${GIN_ABS#"$REPO"/}
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes wants a positive number"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node wants a positive number"
[[ $RUN_ID ]] || RUN_ID=slurm-$(date -u +%Y%m%d-%H%M%S)
[[ $RUN_ID =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ ]] || die "bad --run-id '$RUN_ID'"
[[ $WORKDIR ]] || die "--workdir is required (a shared directory or gs://BUCKET/runs/$RUN_ID)"
PER_NODE=1
[[ $LAYOUT == gpu ]] && PER_NODE=$GPUS
if ((NODES * PER_NODE > 1)); then
  [[ $WORKDIR == gs://?* || $WORKDIR == /* ]] ||
    die "workdir '$WORKDIR' must be gs://... or an absolute path shared by all nodes"
  [[ $WORKDIR != /tmp/* ]] || log "WARNING: $WORKDIR is usually node-local; use a shared path"
fi
for kv in "${USER_ENV[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env '$kv' (want NAME=VALUE)"
  export "${kv?}"
done

TRAINER_ARGS=(--gin "$GIN_REL" --workdir "$WORKDIR" --run_id "$RUN_ID")
for b in "${BINDINGS[@]}"; do TRAINER_ARGS+=(--gin_bindings "$b"); done

OUT_DIR=$REPO/runs/slurm/$RUN_ID
export JCDM_REPO=$REPO JCDM_SLURM_LAYOUT=$LAYOUT JCDM_GPUS_PER_NODE=$GPUS
CMD=(sbatch --parsable --job-name="jcdm-$RUN_ID" --nodes="$NODES" --ntasks-per-node="$PER_NODE"
  --gpus-per-node="$GPUS" --requeue --open-mode=append --signal=TERM@300
  --output="$OUT_DIR/slurm-%j.out" --chdir="$REPO" --export=ALL "${SBATCH_EXTRA[@]}"
  "$INFRA_DIR/slurm/jcdm.sbatch" "${TRAINER_ARGS[@]}")

if ((DRY_RUN)); then
  printf '+ %s\n' "$(shjoin env JCDM_REPO="$REPO" JCDM_SLURM_LAYOUT="$LAYOUT" \
    JCDM_GPUS_PER_NODE="$GPUS" "${CMD[@]}")"
  exit 0
fi
mkdir -p "$OUT_DIR"
job=$("${CMD[@]}")
job=${job%%;*}
log "submitted job $job: run $RUN_ID on $NODES node(s) x $PER_NODE process(es)"
log "log: $OUT_DIR/slurm-$job.out   status: squeue -j $job   stop: scancel $job"
log "checkpoints: $WORKDIR   W&B run id: $RUN_ID"
printf '%s\n' "$job"

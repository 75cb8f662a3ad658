#!/usr/bin/env bash
# Submit jcdm to a SLURM GPU cluster (run from a login node, inside a checkout on a shared
# filesystem with `pip install -e '.[cuda]'` done in .venv or $JCDM_VENV):
#
#   infra/launch_slurm.sh --gin gin/joint.gin --workdir /shared/jcdm/runs/ID --nodes 2 \
#       --gpus-per-node 8 [--per-gpu] [options] [GIN_BINDING...] [-- GIN_BINDING...]
#
# Submits infra/slurm/jcdm.sbatch, which starts one JAX process per node (or per GPU with
# --per-gpu) through srun with jax.distributed settings, and requeues the job itself when the
# trainer exits 75 (preempted after a checkpoint) or crashes (bounded); see docs/operations.md.
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

# shellcheck source-path=SCRIPTDIR source=lib/args.sh
source "$INFRA_DIR/lib/args.sh"

NODES=1 GPUS=8 LAYOUT=node SBATCH_EXTRA=()
WANDB_MODE_=${WANDB_MODE:-} WANDB_PROJECT_=${WANDB_PROJECT:-} WANDB_ENTITY_=${WANDB_ENTITY:-}

launcher_option() { # the SLURM-only options (lib/args.sh parses the shared ones)
  case $1 in
    --nodes) need_arg "$1" $# && NODES=$2 && ARGS_USED=2 ;;
    --gpus-per-node) need_arg "$1" $# && GPUS=$2 && ARGS_USED=2 ;;
    --per-gpu) LAYOUT=gpu ARGS_USED=1 ;;
    --per-node) LAYOUT=node ARGS_USED=1 ;;
    --partition | --account | --qos | --time)
      need_arg "$1" $# && SBATCH_EXTRA+=("$1=$2") && ARGS_USED=2
      ;;
    --sbatch-flag) need_arg "$1" $# && SBATCH_EXTRA+=("$2") && ARGS_USED=2 ;;
  esac
}

parse_args "$@"
check_gin "$REPO"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || usage_error "--nodes wants a positive number"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || usage_error "--gpus-per-node wants a positive number"
check_run_id slurm
[[ $WORKDIR ]] ||
  usage_error "--workdir is required (a shared directory or gs://BUCKET/runs/$RUN_ID)"
PER_NODE=1
[[ $LAYOUT == gpu ]] && PER_NODE=$GPUS
if ((NODES * PER_NODE > 1)); then
  [[ $WORKDIR == gs://?* || $WORKDIR == /* ]] ||
    usage_error "workdir '$WORKDIR' must be gs://... or an absolute path shared by all nodes"
  [[ $WORKDIR != /tmp/* ]] || log "WARNING: $WORKDIR is usually node-local; use a shared path"
fi
check_env
# The batch script runs with --export=ALL: the trainer's environment is this one.
for kv in "${USER_ENV[@]}"; do export "${kv?}"; done
[[ -z $WANDB_MODE_ ]] || export WANDB_MODE=$WANDB_MODE_
[[ -z $WANDB_PROJECT_ ]] || export WANDB_PROJECT=$WANDB_PROJECT_
[[ -z $WANDB_ENTITY_ ]] || export WANDB_ENTITY=$WANDB_ENTITY_
make_trainer_args

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

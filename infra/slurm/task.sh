#!/bin/bash
# One SLURM task = one JAX process; started on every node by `srun` in infra/slurm/jcdm.sbatch.
# Sets JAX_PROCESS_ID from SLURM_PROCID (the batch script exported JAX_COORDINATOR_ADDRESS and
# JAX_NUM_PROCESSES), pins one GPU per process in the per-GPU layout, runs the trainer and records
# its exit code in $JCDM_RC_DIR/rc.$SLURM_PROCID for the batch script's requeue decision.
set -euo pipefail
: "${SLURM_PROCID:?run this under srun}"
export JAX_PROCESS_ID=$SLURM_PROCID

if [[ ${JCDM_SLURM_LAYOUT:-node} == gpu ]]; then
  local_id=${SLURM_LOCALID:-0}
  IFS=, read -r -a devs <<<"${CUDA_VISIBLE_DEVICES:-}"
  if ((${#devs[@]} > 1)); then
    export CUDA_VISIBLE_DEVICES=${devs[$local_id]} # all node GPUs visible: take ours
  elif ((${#devs[@]} == 0)); then
    export CUDA_VISIBLE_DEVICES=$local_id
  fi # exactly one: SLURM already bound a GPU to this task
fi

# SLURM sends SIGTERM to every process of the step on preemption or at --signal time. The trainer
# must get the time to commit its checkpoint, so this shell traps TERM (rather than dying and
# letting SLURM tear the step down) and keeps waiting for the trainer.
trap 'true' TERM
"${JCDM_PYTHON:-python}" -m jcdm "$@" &
child=$!
while :; do
  rc=0
  wait "$child" || rc=$?
  kill -0 "$child" 2>/dev/null || break
done
if [[ -n ${JCDM_RC_DIR:-} ]]; then printf '%s\n' "$rc" >"$JCDM_RC_DIR/rc.$SLURM_PROCID" || true; fi
exit "$rc"

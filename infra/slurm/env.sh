# shellcheck shell=bash
# Environment of a jcdm job on a SLURM GPU cluster. infra/slurm/jcdm.sbatch sources this file in the
# batch shell (first node) before `srun`, which exports everything to every task. Any variable
# exported before `sbatch` / infra/launch_slurm.sh wins over the defaults below.

# ---- site specific: adapt to your cluster --------------------------------------------------------
# module load cuda/12.4 cudnn/9.1
# export NCCL_SOCKET_IFNAME=ib0          # the interconnect NCCL should use
# export NCCL_IB_HCA=mlx5

# ---- python environment (a venv in the shared repo checkout, made with `pip install -e '.[cuda]'`)
JCDM_VENV=${JCDM_VENV:-$JCDM_REPO/.venv}
if [[ -f $JCDM_VENV/bin/activate ]]; then
  # shellcheck source=/dev/null
  source "$JCDM_VENV/bin/activate"
fi
export JCDM_PYTHON=${JCDM_PYTHON:-python}

# ---- JAX / XLA / NCCL ----------------------------------------------------------------------------
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1
# jax.distributed coordinator port on the first node; derived from the job id so that two jobs
# sharing a node do not collide, and stable across requeues of the same job.
export JCDM_COORD_PORT=${JCDM_COORD_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

# ---- Weights & Biases (WANDB_PROJECT, WANDB_ENTITY, WANDB_API_KEY come from the submitting shell)
export WANDB_MODE=${WANDB_MODE:-online}

# ---- requeue policy (infra/slurm/jcdm.sbatch) ----------------------------------------------------
# exit 75 (checkpointed after SIGTERM) is requeued up to JCDM_MAX_REQUEUES times in total;
# exit 1 and other crashes up to JCDM_MAX_FAILURE_REQUEUES times in a row; exit 0, 2, 3 never.
export JCDM_MAX_REQUEUES=${JCDM_MAX_REQUEUES:-1000}
export JCDM_MAX_FAILURE_REQUEUES=${JCDM_MAX_FAILURE_REQUEUES:-3}

"""Process exit codes of the trainer: the contract with launchers and schedulers.

`infra/launch_tpu_vm.sh` and `infra/slurm/*.sbatch` decide whether to restart from these alone.
"""

SUCCESS = 0
"""Training reached `train.num_steps` (the final checkpoint is written): do not restart."""

FAILURE = 1
"""An unexpected error (a bug, a lost host, an I/O failure). Restarting may help; launchers retry a
bounded number of times."""

USAGE = 2
"""Bad command line, gin file, binding, dataset or workdir. Restarting cannot help."""

NUMERICAL = 3
"""A non-finite loss or gradient. The last good checkpoint is kept; restarting would repeat it."""

PREEMPTED = 75
"""Preemption notice (SIGTERM) handled: a checkpoint at the agreed step was written and committed.
Restart the same command to resume. 75 is EX_TEMPFAIL from sysexits.h."""

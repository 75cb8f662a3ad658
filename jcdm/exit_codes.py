"""Process exit codes of the trainer and the restart policy: the contract with the launchers.

This file is the one definition of the policy. Python callers (`jcdm.dev.launch_local`,
`bench/soak.py`) import it; the bash launchers (`infra/launch_tpu_vm.sh`,
`infra/slurm/jcdm.sbatch`) run it as a script, which needs nothing but the standard library:

    python3 jcdm/exit_codes.py decide 1 137 75     # prints "75 resume"
    python3 jcdm/exit_codes.py decide 75 4         # prints "4 stop"

`decide` combines the codes of a job's processes (`combine`) and names what to do (`action`).

- 0 (done): reached `train.num_steps`, final checkpoint committed.
- 2 (stop): found before the first step: command line, gin, data, mesh, or checkpoints that do
  not fit the configuration.
- 3 (stop): non-finite loss or gradient (the last good checkpoint is kept).
- 4 (stop): interrupted by the user (SIGINT/Ctrl-C or SIGHUP): checkpoint at the agreed step
  committed (a second Ctrl-C exits 4 at once, keeping the last committed one); rerun to resume.
- 75 (resume): preempted (SIGTERM); checkpoint at the agreed step committed.
- 1, 128+n, anything else (retry, bounded): any failure once training has started (crash, lost
  or stalled peer, failed save, I/O), or a process killed by signal n.
"""

from __future__ import annotations

import sys

SUCCESS = 0
"""Training reached `train.num_steps` (the final checkpoint is committed): do not restart."""

FAILURE = 1
"""Any error once training has started (a bug, a lost or stalled peer, a failed save, an I/O
error). Restarting may help; launchers retry a bounded number of times in a row."""

USAGE = 2
"""A problem found before the first step: bad command line, gin file or binding, dataset, mesh,
or checkpoints that do not fit the configuration. Restarting cannot help."""

NUMERICAL = 3
"""A non-finite loss or gradient. The last good checkpoint is kept; restarting would repeat it."""

INTERRUPTED = 4
"""Interrupted by the user (SIGINT, i.e. Ctrl-C, or SIGHUP): the processes agreed on a step, and a
checkpoint there was committed; after a second Ctrl-C the process exits at once with this code,
keeping the last committed checkpoint. An interrupt is the user's decision: never retried. Rerun
the same command to resume."""

PREEMPTED = 75
"""Preemption notice (SIGTERM) handled: a checkpoint at the agreed step was written and committed.
Restart the same command to resume. 75 is EX_TEMPFAIL from sysexits.h."""

PRIORITY = (NUMERICAL, USAGE, INTERRUPTED, PREEMPTED)
"""Codes that explain a whole-job stop, strongest first: a survivor that exits 1 because its peer
stopped first must not mask the peer's cause, and a process that stopped for a peer's Ctrl-C (75)
must not turn the user's interrupt into a restart."""

DONE, STOP, RESUME, RETRY = "done", "stop", "resume", "retry"
"""`action`s: finished; do not restart; restart at once (not a failure); restart after a
backoff, a bounded number of times in a row."""


def normalize(code: int) -> int:
    """A `subprocess` return code -n (killed by signal n) as the shell's 128 + n."""
    return 128 - code if code < 0 else code


def combine(codes: list[int]) -> int:
    """One exit code for a job from its processes' codes: the strongest of `PRIORITY`, else the
    first other failure, else 0."""
    codes = [normalize(c) for c in codes]
    for c in PRIORITY:
        if c in codes:
            return c
    return next((c for c in codes if c != SUCCESS), SUCCESS)


def action(code: int) -> str:
    """What a launcher does after a job ended with `code` (one of DONE, STOP, RESUME, RETRY)."""
    code = normalize(code)
    if code == SUCCESS:
        return DONE
    if code in (USAGE, NUMERICAL, INTERRUPTED):
        return STOP
    if code == PREEMPTED:
        return RESUME
    return RETRY


def _main(argv: list[str]) -> int:
    usage = "usage: exit_codes.py {combine|action|decide} CODE [CODE...]"
    if len(argv) < 2 or argv[0] not in ("combine", "action", "decide"):
        print(usage, file=sys.stderr)
        return USAGE
    try:
        codes = [int(c) for c in argv[1:]]
    except ValueError:
        print(f"exit_codes.py: codes must be integers, got {argv[1:]}", file=sys.stderr)
        return USAGE
    rc = combine(codes)
    out = {"combine": str(rc), "action": action(rc), "decide": f"{rc} {action(rc)}"}[argv[0]]
    print(out)
    return SUCCESS


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

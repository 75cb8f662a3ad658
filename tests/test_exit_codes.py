"""The exit-code contract and restart policy: one definition (jcdm/exit_codes.py) that the
Python launchers import and the bash launchers run as a script."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from jcdm import exit_codes as ec
from jcdm.dev import launch_local
from tests.trainer import QUIET, run_trainer

CODES = [0, 1, 2, 3, 4, 75, 129, 130, 134, 137, -9, -15]


def test_combine_and_action():
    assert ec.combine([0, 0]) == 0 and ec.action(0) == ec.DONE
    assert ec.combine([1, -9]) == 1  # the survivor's 1, then the killed peer's 137
    assert ec.combine([0, -9]) == 137 and ec.action(-9) == ec.RETRY
    assert ec.combine([1, 3]) == 3 and ec.action(3) == ec.STOP  # a NaN explains the peers' 1
    assert ec.combine([75, 1]) == 75 and ec.action(75) == ec.RESUME
    assert ec.combine([2, 75]) == 2 and ec.action(2) == ec.STOP
    assert ec.action(1) == ec.action(134) == ec.action(143) == ec.RETRY
    # Ctrl-C/SIGHUP: the user's decision, never retried, and not masked by a peer's 75 or 1.
    assert ec.combine([75, 4]) == 4 and ec.combine([1, 4]) == 4 and ec.action(4) == ec.STOP
    assert ec.combine([4, 2]) == 2


def test_the_script_the_bash_launchers_run_agrees_with_python(repo):
    """`python3 jcdm/exit_codes.py decide ...` in an isolated interpreter (-I -S: no jcdm
    package, no site-packages) prints exactly combine() and action() for every pair of codes."""
    cases = [list(c) for c in itertools.product(CODES, repeat=2)] + [[3, 2, 75, 1]]
    script = "\n".join(" ".join(map(str, c)) for c in cases)
    driver = (
        "import subprocess, sys\n"
        "for line in sys.stdin.read().splitlines():\n"
        "    out = subprocess.run([sys.executable, '-I', '-S', 'jcdm/exit_codes.py', 'decide',"
        " *line.split()], capture_output=True, text=True, check=True).stdout\n"
        "    print(out.strip())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", driver], input=script, cwd=repo, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    got = r.stdout.splitlines()
    want = [f"{ec.combine(c)} {ec.action(ec.combine(c))}" for c in cases]
    assert got == want
    bad = subprocess.run(
        [sys.executable, "-I", "jcdm/exit_codes.py", "decide", "x"], cwd=repo, capture_output=True
    )
    assert bad.returncode == ec.USAGE


@pytest.mark.parametrize("script", ["infra/launch_tpu_vm.sh", "infra/slurm/jcdm.sbatch"])
def test_bash_launchers_hold_no_copy_of_the_policy(repo, script):
    text = open(f"{repo}/{script}").read()
    assert 'jcdm/exit_codes.py" decide' in text
    assert "for c in 3 2 75" not in text and "saw_75" not in text


def test_launch_local_uses_the_same_policy():
    assert launch_local.combine is ec.combine


# --- the trainer's side of the contract (real processes) ----------------------------------------

SMOKE = [
    "--gin",
    "gin/smoke.gin",
    *QUIET,
    "--gin.train.num_steps=4",
    "--gin.train.curriculum_steps=8",
]


@pytest.mark.slow
def test_an_error_after_training_started_exits_1_and_is_retried(tmp_path):
    """A ValueError once training runs (here a test hook at step 2) is a failure to retry (1),
    not a configuration error (2): before, every ValueError exited 2 and stranded the run."""
    r = run_trainer(
        [*SMOKE, "--workdir", str(tmp_path / "w"), "--gin.train.test_fault='value_error@2'"]
    )
    assert r.returncode == ec.FAILURE, r.stderr[-3000:]
    assert "ValueError: test fault: value_error at step 2" in r.stderr
    assert "retried by the launchers" in r.stderr
    assert ec.action(r.returncode) == ec.RETRY


@pytest.mark.slow
def test_a_checkpoint_of_another_configuration_exits_2_before_compiling(tmp_path):
    import jax.numpy as jnp

    from jcdm.runtime import checkpoint as ckpt_lib

    workdir = tmp_path / "w"
    other = ckpt_lib.Checkpointer(
        str(workdir / "checkpoints"), ckpt_lib.CheckpointConfig(async_save=False)
    )
    other.save(5, {"params": {"w": jnp.zeros(3)}, "step": jnp.int32(5)}, None, force=True)
    other.close()
    r = run_trainer([*SMOKE, "--workdir", str(workdir)])
    assert r.returncode == ec.USAGE, r.stderr[-3000:]
    assert "CheckpointMismatch" in r.stderr and "written by another configuration" in r.stderr
    assert "a restart cannot help" in r.stderr
    assert "compiled" not in r.stderr  # found before the train step was compiled
    assert ec.action(r.returncode) == ec.STOP

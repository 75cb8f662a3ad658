"""The exit-code contract and restart policy: one definition (jcdm/exit_codes.py) that the
Python launchers import and the bash launchers run as a script."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from jcdm import exit_codes as ec
from jcdm.dev import launch_local

CODES = [0, 1, 2, 3, 75, 134, 137, -9, -15]


def test_combine_and_action():
    assert ec.combine([0, 0]) == 0 and ec.action(0) == ec.DONE
    assert ec.combine([1, -9]) == 1  # the survivor's 1, then the killed peer's 137
    assert ec.combine([0, -9]) == 137 and ec.action(-9) == ec.RETRY
    assert ec.combine([1, 3]) == 3 and ec.action(3) == ec.STOP  # a NaN explains the peers' 1
    assert ec.combine([75, 1]) == 75 and ec.action(75) == ec.RESUME
    assert ec.combine([2, 75]) == 2 and ec.action(2) == ec.STOP
    assert ec.action(1) == ec.action(134) == ec.action(143) == ec.RETRY


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

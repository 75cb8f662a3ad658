"""One owner per workdir and clean Ctrl-C/SIGHUP, with real trainer processes and real signals.

One workdir, four processes in turn:
  A trains and commits checkpoints; it is stopped (SIGSTOP) while
  B starts on the same workdir with another learning rate: exit 2 within seconds, naming A, and
    nothing in the workdir changed (A's committed checkpoints byte-identical);
  A is SIGKILLed; C (the restart) takes the lease over at once (A's pid is gone), resumes, and a
    SIGHUP during a save ends it with exit 4 after a committed checkpoint at the agreed step;
  D (a launcher's restart with its token, over a fresh lease of a vanished host) takes over at
    once and resumes from C's checkpoint; Ctrl-C during its compile: one step, a save, exit 4;
  E resumes from D's; Ctrl-C while it starts and a second one: exit 4 at once, D's checkpoint
    kept, its stale lease taken over at once on this host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from jcdm import exit_codes
from jcdm.runtime import lease as lease_lib
from tests.trainer import REPO, launch_local_argv, run_trainer

pytestmark = pytest.mark.slow

ARGS = [
    "--gin", "gin/smoke.gin", "--gin.EvalConfig.every=0", "--gin.train.num_steps=400",
    "--gin.train.curriculum_steps=8", "--gin.CheckpointConfig.save_every=2",
]  # fmt: skip


class Trainer:
    def __init__(self, workdir: str, log: str, env: dict | None = None):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jcdm", *ARGS, "--workdir", workdir],
                cwd=REPO,
                env={**os.environ, **(env or {})},
                stdout=f,
                stderr=subprocess.STDOUT,
                text=True,
            )

    @property
    def out(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait_for(self, cond, timeout: float = 300):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            got = cond()
            if got:
                return got
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.out[-3000:]}"
            time.sleep(0.02)
        raise AssertionError(f"timed out:\n{self.out[-3000:]}")

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)


def committed(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def saving(workdir: str, after: int) -> bool:
    d = os.path.join(workdir, "checkpoints")
    names = os.listdir(d) if os.path.isdir(d) else []
    return any(
        (m := re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", n)) and int(m[1]) > after
        for n in names
    )


def snapshot(workdir: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_one_owner_per_workdir_and_clean_interrupts(tmp_path):
    wd = str(tmp_path / "run")
    # --- A holds the workdir ------------------------------------------------------------------
    a = Trainer(wd, str(tmp_path / "a.log"))
    a.wait_for(lambda: len(committed(wd)) >= 2)
    holder = json.load(open(os.path.join(wd, "LEASE")))
    run_id = open(os.path.join(wd, "run_id")).read().strip()
    assert holder["pid"] == a.proc.pid and holder["run_id"] == run_id
    os.kill(a.proc.pid, signal.SIGSTOP)
    time.sleep(1.0)  # let a save in flight settle into the snapshot as a temporary directory
    before = snapshot(wd)

    # --- B: refused at once, before it writes anything ------------------------------------------
    t0 = time.monotonic()
    b = run_trainer([*ARGS, "--gin.make_optimizer.learning_rate=2e-4", "--workdir", wd])
    b_s = time.monotonic() - t0
    assert b.returncode == exit_codes.USAGE, b.stderr[-3000:]
    msg = b.stderr + b.stdout
    for part in (f"run {run_id}", f"pid {a.proc.pid}", holder["host"], "since ",
                 "--take_over_lease", "(exit 2)"):  # fmt: skip
        assert part in msg, (part, msg[-2000:])
    assert "compiled" not in msg  # stopped before building anything
    assert b_s < 60, b_s  # the interpreter and JAX start-up on a loaded 2-core box
    assert snapshot(wd) == before  # A's checkpoints, metrics, config: byte-identical

    # --- A dies (SIGKILL); its restart C takes over at once -------------------------------------
    os.kill(a.proc.pid, signal.SIGKILL)
    a.wait()
    last_a = max(committed(wd))
    c = Trainer(wd, str(tmp_path / "c.log"))
    c.wait_for(lambda: "took over the workdir lease" in c.out)
    assert "its process is gone" in c.out
    resumed = int(c.wait_for(lambda: re.search(r"resumed from step (\d+)", c.out))[1])
    assert resumed == last_a
    c.wait_for(lambda: saving(wd, resumed), timeout=300)
    os.kill(c.proc.pid, signal.SIGHUP)  # during a save
    t_sig = time.monotonic()
    assert c.wait(timeout=120) == exit_codes.INTERRUPTED, c.out[-3000:]
    assert time.monotonic() - t_sig < 60
    k = int(re.search(r"interrupted: checkpoint at step (\d+) committed", c.out)[1])
    assert k > resumed and k in committed(wd), (k, committed(wd))
    assert "received SIGHUP" in c.out and "Traceback" not in c.out
    assert not os.path.exists(os.path.join(wd, "LEASE"))  # released at the end

    # --- D: a launcher's restart after its VM vanished; Ctrl-C while it compiles ------------------
    # The previous attempt's lease, from a host that is gone, renewed a moment ago: only the
    # launcher's restart token lets the new attempt in at once.
    now = time.time()
    stale = {"host": "vanished-vm", "boot_id": "x", "pid": 1, "run_id": run_id, "started": now,
             "renewed": now, "expires": now + 60, "token": "launch-7"}  # fmt: skip
    with open(os.path.join(wd, "LEASE"), "w") as f:
        json.dump(stale, f)
    d = Trainer(wd, str(tmp_path / "d.log"), env={"JCDM_LEASE_TOKEN": "launch-7"})
    d.wait_for(lambda: "took over the workdir lease" in d.out)
    assert "restart token" in d.out and "vanished-vm" in d.out
    d.wait_for(lambda: f"resumed from step {k}" in d.out)  # logged just before the compile
    os.kill(d.proc.pid, signal.SIGINT)
    assert d.wait(timeout=120) == exit_codes.INTERRUPTED, d.out[-3000:]
    out = d.out
    assert out.index("received SIGINT: will save") < out.index("train step compiled")
    k2 = int(re.search(r"interrupted: checkpoint at step (\d+) committed", out)[1])
    assert k2 == k + 1 and k2 in committed(wd)
    assert "Traceback" not in out and not os.path.exists(os.path.join(wd, "LEASE"))

    # --- E: Ctrl-C while it starts, then again: exits at once (nothing to compile or save) --------
    e = Trainer(wd, str(tmp_path / "e.log"))
    e.wait_for(lambda: f"resumed from step {k2}" in e.out)
    os.kill(e.proc.pid, signal.SIGINT)
    e.wait_for(lambda: "received SIGINT: will save" in e.out, timeout=30)
    os.kill(e.proc.pid, signal.SIGINT)
    t_sig = time.monotonic()
    assert e.wait(timeout=30) == exit_codes.INTERRUPTED, e.out[-3000:]
    assert time.monotonic() - t_sig < 5
    assert "received SIGINT again: exiting at once" in e.out
    assert "train step compiled" not in e.out  # out of the middle of the compile
    assert k2 in committed(wd)  # the last committed checkpoint is kept
    # E left its lease behind (no release on an immediate exit): the next run on this host takes
    # it over at once, as its pid is gone.
    assert json.load(open(os.path.join(wd, "LEASE")))["pid"] == e.proc.pid
    lease_lib.acquire(wd, run_id=run_id).release()


def test_a_held_workdir_stops_every_process_of_a_job_with_exit_2(tmp_path):
    """Process 0 asks for the lease; process 1 learns the refusal from it and exits 2 too."""
    wd = str(tmp_path / "run")
    held = lease_lib.acquire(wd, run_id="holder")  # this (live) test process holds it
    try:
        r = subprocess.run(
            launch_local_argv(2, 1, ARGS, wd), cwd=REPO, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
    finally:
        held.release()
    assert r.returncode == exit_codes.USAGE, r.stdout[-3000:]
    assert "exit codes [2, 2] -> 2" in r.stdout
    for p in ("p0", "p1"):
        assert re.search(rf"\[{p}\] .*held by run holder \(host .*pid {os.getpid()}", r.stdout)
    assert sorted(os.listdir(wd)) == ["LEASE.lock"]  # nothing of the refused job was written

"""Stall detection with real processes (issue #14, item 2): a stopped process (SIGSTOP: no thread
of it runs) and a process whose main thread hangs while its other threads live both end the job
with exit 1 within the stated time, with a message naming the stalled process and the stacks of
the threads in the log. Both 2-process runs start together (one compile each, in parallel)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from jcdm import exit_codes
from tests.trainer import launch_local_argv

pytestmark = pytest.mark.slow

BASE = [
    "--gin", "gin/smoke.gin", "--gin.EvalConfig.every=0", "--gin.train.num_steps=100000",
    "--gin.train.curriculum_steps=8", "--gin.CheckpointConfig.save_every=100000",
]  # fmt: skip
PEER_SILENCE_S = 10.0  # StallConfig.peer_silence_s's default
HANG_TIMEOUT_S = 10.0
KILL_AFTER_S = 5.0
GRACE_S = 6.0  # the stated grace: the peer's 1 s exit grace, the monitor's 1 s tick, scheduling
TIMEOUT_S = 600


class Launch:
    def __init__(self, repo: str, name: str, workdir: str, args: list[str]):
        self.log_path = os.path.join(os.path.dirname(workdir), name + ".log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                launch_local_argv(2, 2, [*BASE, *args], workdir, kill_after=KILL_AFTER_S),
                cwd=repo, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.t0 = time.monotonic()
        self.first_exit: float | None = None
        self.fault_at: float | None = None

    @property
    def out(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def pid(self, i: int) -> int:
        return int(re.search(rf"\[launch\] process {i} pid (\d+)", self.out)[1])

    def poll(self) -> bool:
        """Watch the log; True while the launcher runs."""
        if self.first_exit is None and "exited with code" in self.out:
            self.first_exit = time.monotonic()
        if self.fault_at is None and "test fault: hang" in self.out:
            self.fault_at = time.monotonic()
        return self.proc.poll() is None


@pytest.fixture(scope="module")
def runs(repo, tmp_path_factory):
    base = tmp_path_factory.mktemp("stall")
    stop = Launch(repo, "sigstop", str(base / "sigstop"), [])
    hang = Launch(
        repo, "hang", str(base / "hang"),
        ["--gin.train.test_fault='hang@3:1'", f"--gin.StallConfig.timeout_s={HANG_TIMEOUT_S}",
         "--gin.StallConfig.slow_step_factor=1"],
    )  # fmt: skip
    stopped_at = None
    try:
        while any([stop.poll(), hang.poll()]) and time.monotonic() - stop.t0 < TIMEOUT_S:
            if stopped_at is None and re.search(r"\[p0\] \[[#-]*\] 3/", stop.out):
                os.kill(stop.pid(1), signal.SIGSTOP)
                stopped_at = time.monotonic()
            time.sleep(0.05)
    finally:
        for launch in (stop, hang):
            if launch.proc.poll() is None:
                launch.proc.kill()
    stop.stopped_at, stop.ended = stopped_at, time.monotonic()
    return stop, hang


def test_a_stopped_process_is_named_and_ends_the_job(runs):
    stop, _ = runs
    out = stop.out
    assert stop.stopped_at is not None, out[-3000:]
    assert stop.proc.returncode == exit_codes.FAILURE, out[-3000:]
    assert "exit codes [1, -9] -> 1" in out  # process 0 exits 1; the launcher kills the stopped 1
    assert re.search(r"\[p0\] .*process 0: process 1 stopped responding: no heartbeat", out)
    assert "stacks of every thread of process 0 (waiting for process 1" in out
    detected = stop.first_exit - stop.stopped_at
    print(f"\nSIGSTOP of process 1: process 0 exited after {detected:.1f}s")
    assert detected < PEER_SILENCE_S + GRACE_S, out[-3000:]
    assert "Terminating process because the JAX distributed service" not in out  # we came first


def test_a_hung_main_thread_is_named_with_its_stack_and_ends_the_job(runs):
    _, hang = runs
    out = hang.out
    assert hang.proc.returncode == exit_codes.FAILURE, out[-3000:]
    assert "exit codes [1, 1] -> 1" in out
    m = re.search(r"\[p1\] .*process 1 stalled: no training step completed for (\d+)s after "
                  r"step 3 \(limit (\d+)s\); main thread at .*faults\.py", out)  # fmt: skip
    assert m, out[-3000:]
    limit = float(m[2])
    assert limit == HANG_TIMEOUT_S or limit < 3 * HANG_TIMEOUT_S  # 1 x the slowest step at most
    # Its stacks, then the peer's message naming it.
    assert re.search(r"\[p1\] === jcdm: stacks of every thread of process 1", out)
    assert re.search(r"\[p1\] .*File .*jcdm/training/faults\.py", out)
    assert re.search(r"\[p0\] .*process 0: process 1 stalled \(process 1 stalled", out)
    ended = hang.first_exit - hang.fault_at
    print(f"\nhung main thread: job ended {ended:.1f}s after the hang (limit {limit:g}s)")
    assert ended < limit + GRACE_S, out[-3000:]

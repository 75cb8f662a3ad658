"""Multi-host training through real processes.

Every trainer run here goes through `python -m jcdm.dev.launch_local`: N processes on 127.0.0.1 with
M simulated CPU devices each, joined by `jax.distributed` and gloo collectives, exactly the code
path of a TPU pod or a GPU cluster. Nothing is mocked.

Cost: XLA:CPU compiles dominate. The runs are module-scoped fixtures shared between tests, and
each training configuration compiles once. `train.curriculum_steps=8` keeps the compiled step
identical to smoke.gin's (the curriculum length is a constant of the program) while only
STEPS updates run, so the persistent compilation cache can serve other tests' smoke runs too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from jcdm.dev import launch_local
from jcdm.runtime import mesh as mesh_lib
from tests.trainer import launch_local_argv

STEPS = 4
BASE = [
    "--gin",
    "gin/smoke.gin",
    f"--gin.train.num_steps={STEPS}",
    "--gin.train.curriculum_steps=8",
    "--gin.EvalConfig.every=0",
]
FSDP = [
    "--gin.make_mesh.fsdp=4",
    "--gin.state_shardings.strategy='fsdp'",
    # smoke.gin's arrays are tiny; a low threshold makes FSDP really shard most of them.
    "--gin.state_shardings.fsdp_min_size=256",
]
# The FSDP program (and the 1x4 one) are tests/test_checkpoint.py's too: the compile cache
# serves whichever file runs second. The fused optimizer (impl='fused', 'auto' on GPUs and TPUs)
# is checked in-process (tests/test_update.py): its cold compile costs 2.7x the per-leaf one.
# Float reduction order differs between meshes (per-device partial sums, gloo across processes);
# measured differences are ~1e-6 relative, so this tolerance still catches any real mismatch
# (a wrong batch row, noise draw or dropout mask changes the loss at the 1e-2 level).
RTOL = 1e-4
COMPARED = ("loss", "loss_ct", "loss_dsm", "grad_norm", "num_scales")


@dataclasses.dataclass
class Run:
    rc: int
    out: str
    seconds: float
    workdir: str
    killed_after_s: float | None = None  # launcher exit, seconds after a process was killed

    @property
    def metrics(self) -> list[dict]:
        """The first STEPS rows (the kill run logs a few more before it is stopped)."""
        with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()][:STEPS]

    def series(self, key: str) -> np.ndarray:
        return np.array([m[key] for m in self.metrics], np.float64)


class Launch:
    """One `python -m jcdm.dev.launch_local` in the background; a thread reads its output so that
    several launches can run at once and a test can act on a line as it appears."""

    def __init__(self, repo: str, workdir: str, num: int, devices: int, args: list[str]):
        self.workdir = workdir
        self.lines: list[str] = []
        self.pids: dict[int, int] = {}
        self.kill_at_line: str | None = None  # regex: SIGKILL process 1 when a line matches
        self.killed_at: float | None = None
        self.ended_at: float | None = None
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            launch_local_argv(num, devices, list(args), workdir),
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # ends when the launcher and its children are gone
            self.lines.append(line)
            if m := re.match(r"\[launch\] process (\d+) pid (\d+)", line):
                self.pids[int(m[1])] = int(m[2])
            if self.killed_at is None and self.kill_at_line and re.match(self.kill_at_line, line):
                os.kill(self.pids[1], signal.SIGKILL)
                self.killed_at = time.monotonic()
        self.proc.wait()
        self.ended_at = time.monotonic()

    def result(self, deadline: float) -> Run:
        self.reader.join(timeout=max(deadline - time.monotonic(), 1))
        if self.reader.is_alive():  # timed out: end the launcher and the trainers it started
            self.proc.kill()
            for pid in self.pids.values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.reader.join(timeout=10)
            pytest.fail(f"{self.workdir} timed out:\n{''.join(self.lines)[-4000:]}")
        killed_after = None if self.killed_at is None else self.ended_at - self.killed_at
        return Run(
            self.proc.returncode,
            "".join(self.lines),
            self.ended_at - self.t0,
            self.workdir,
            killed_after,
        )


# --- the runs -------------------------------------------------------------------------------------
# All launches start at once: a one-process compile keeps one core busy, so running the
# configurations side by side fills both cores of a CI runner (about a third faster than one
# after the other). Each configuration still compiles exactly once.

ERRORS = {
    # 2 processes: the error path of a real multi-process start (both exit 2, launcher says 2).
    "mesh_mismatch": (
        2,
        2,
        ["--gin.make_mesh.data=3", "--gin.make_mesh.fsdp=2"],
        r"mesh \{'data': 3, 'fsdp': 2\} needs 6 devices but 4 are present",
    ),
    "indivisible_batch": (
        1,
        4,
        ["--gin.train.global_batch_size=10"],
        r"global batch 10 does not divide across 4 devices",
    ),
    "unshardable_parameter": (
        1,
        4,
        [
            "--gin.make_mesh.fsdp=4",
            "--gin.state_shardings.strategy='fsdp'",
            "--gin.state_shardings.fsdp_min_size=1",
        ],
        r"parameter .* with shape \(\d+,?.*\) has no axis divisible by fsdp=4",
    ),
}


@pytest.fixture(scope="module")
def runs(repo, tmp_path_factory) -> dict[str, Run]:
    work = tmp_path_factory.mktemp("multihost")
    launches = {
        name: Launch(repo, str(work / f"err_{name}"), num, devices, [*BASE, *extra])
        for name, (num, devices, extra, _) in ERRORS.items()
    }
    launches["1x4"] = Launch(repo, str(work / "1x4"), 1, 4, BASE)
    launches["1x1"] = Launch(repo, str(work / "1x1"), 1, 1, BASE)
    # 2 x 2 replicated (the program of tests/test_stall.py and bench/soak.py) also serves
    # the killed-process test: a run too long to finish, in which process 1 is SIGKILLed once
    # process 0 has printed step STEPS + 1. Its first STEPS metrics rows equal a STEPS-step
    # run's (the compiled step depends on curriculum_steps, not num_steps), so one compile
    # serves both checks.
    launches["2x2"] = Launch(repo, str(work / "2x2"), 2, 2, [*BASE, "--gin.train.num_steps=100000"])
    launches["2x2"].kill_at_line = rf"\[p0\] \[#*-*\] {STEPS + 1}/"
    # FSDP over all 4 devices of both processes (every sharded array split across the
    # processes), with the sampler and sample grids on (EMA params sharded); compared with the
    # replicated per-leaf run above.
    launches["2x2_fsdp"] = Launch(
        repo, str(work / "2x2_fsdp"), 2, 2, [*BASE, *FSDP, "--gin.EvalConfig.every=4"]
    )
    deadline = time.monotonic() + 900
    results = {name: launch.result(deadline) for name, launch in launches.items()}
    print("\nseconds per launch (concurrent):", {k: round(r.seconds) for k, r in results.items()})
    return results


def _ok(run: Run) -> Run:
    assert run.rc == 0, run.out[-6000:]
    return run


@pytest.fixture(scope="module")
def run_1x4(runs) -> Run:
    return _ok(runs["1x4"])


@pytest.fixture(scope="module")
def run_1x1(runs) -> Run:
    return _ok(runs["1x1"])


@pytest.fixture(scope="module")
def run_2x2(runs) -> Run:
    return runs["2x2"]  # killed on purpose: its exit code is checked by the kill test


@pytest.fixture(scope="module")
def run_2x2_fsdp_eval(runs) -> Run:
    return _ok(runs["2x2_fsdp"])


def _max_rel_diff(a: Run, b: Run) -> dict[str, float]:
    diffs = {}
    for key in COMPARED:
        x, y = a.series(key), b.series(key)
        assert x.shape == y.shape == (STEPS,), (key, x, y)
        diffs[key] = float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-12)))
    return diffs


# --- the numbers do not depend on the process or device count -------------------------------------


@pytest.mark.slow
def test_loss_trajectory_is_the_same_on_1x4_2x2_and_1x1(run_1x4, run_2x2, run_1x1):
    ref = run_1x1
    assert [m["step"] for m in ref.metrics] == list(range(1, STEPS + 1))
    # The curriculum really moves during the compared steps (K' = 1 at curriculum_steps=8).
    assert len(set(ref.series("num_scales"))) == STEPS
    print("\nloss 1x1:", ref.series("loss").tolist())
    for name, run in [("1x4", run_1x4), ("2x2", run_2x2)]:
        diffs = _max_rel_diff(run, ref)
        abs_loss = float(np.max(np.abs(run.series("loss") - ref.series("loss"))))
        print(f"{name} vs 1x1: max |dloss| {abs_loss:.3g}, max rel diff {diffs}")
        assert max(diffs.values()) < RTOL, (name, diffs)


@pytest.mark.slow
def test_two_processes_log_their_mesh_and_only_process_0_writes(run_2x2):
    out = run_2x2.out
    for i in range(2):
        mesh = rf"\[p{i}\] .*process {i}/2 mesh \{{'data': 4, 'fsdp': 1\}} local devices \[\d+, "
        assert re.search(mesh, out), out[-3000:]
    # One metrics row per step, not one per process; the progress bar comes from process 0 only.
    assert [m["step"] for m in run_2x2.metrics] == list(range(1, STEPS + 1))
    assert not re.search(r"\[p1\] \[#*-*\] \d+/", out)
    assert os.path.exists(os.path.join(run_2x2.workdir, "config.gin"))


@pytest.mark.slow
def test_fsdp_matches_replicated_and_samples_on_two_processes(run_2x2, run_2x2_fsdp_eval):
    out = run_2x2_fsdp_eval.out
    assert "mesh {'data': 1, 'fsdp': 4}" in out
    sharded = re.search(r"state sharding fsdp over fsdp=4: (\d+) arrays sharded \(([\d.]+)%", out)
    assert sharded and int(sharded[1]) > 0 and float(sharded[2]) > 50, out[-3000:]
    assert "optimizer: PerLeaf" in out and "optimizer: PerLeaf" in run_2x2.out
    diffs = _max_rel_diff(run_2x2_fsdp_eval, run_2x2)
    print("\nfsdp vs replicated (2x2): max rel diff", diffs)
    assert max(diffs.values()) < RTOL, diffs
    assert "exit codes [0, 0] -> 0" in out  # a clean end: final checkpoint, shutdown barrier
    # The sampler ran under jit on the FSDP-sharded EMA parameters and process 0 wrote the grids.
    samples = os.path.join(run_2x2_fsdp_eval.workdir, "samples")
    assert sorted(os.listdir(samples)) == ["1step_0000004.png", "2step_0000004.png"]


# --- a dead process ends the job promptly ---------------------------------------------------------


@pytest.mark.slow
def test_killed_process_makes_the_survivor_exit(run_2x2):
    """SIGKILL of process 1 during training: process 0 exits non-zero on its own (peer watchdog,
    or gloo's own connection error, whichever comes first), well before the 30 s heartbeat
    timeout and the launcher's 30 s kill, and the launcher reports the failure."""
    out = run_2x2.out
    assert run_2x2.killed_after_s is not None, f"training never reached step {STEPS + 1}"
    print(f"\nlauncher returned {run_2x2.rc} {run_2x2.killed_after_s:.2f}s after SIGKILL of p1")
    assert run_2x2.rc == 1, out[-3000:]
    assert "exit codes [1, -9] -> 1" in out, out[-3000:]
    assert "[p0]" in out and "process 1 exited or was killed" in out, out[-3000:]
    assert run_2x2.killed_after_s < 15, out[-3000:]


# --- configuration errors are clear and exit 2 before compiling -----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_mesh_batch_or_sharding_exits_2_before_compiling(runs, name):
    run = runs[name]
    assert run.rc == 2, run.out[-3000:]
    assert re.search(ERRORS[name][3], run.out), run.out[-3000:]
    assert "MeshError" in run.out
    assert "compiled" not in run.out  # failed before the train step was compiled


# --- cheap unit checks of the rules ---------------------------------------------------------------


def test_mesh_axis_sizes():
    assert mesh_lib.resolve_axis_sizes((-1, 1), 8) == (8, 1)
    assert mesh_lib.resolve_axis_sizes((-1, 4), 8) == (2, 4)
    assert mesh_lib.resolve_axis_sizes((2, -1), 8) == (2, 4)
    with pytest.raises(mesh_lib.MeshError, match="needs 6 devices but 8"):
        mesh_lib.resolve_axis_sizes((3, 2), 8)
    with pytest.raises(mesh_lib.MeshError, match="3 does not divide 8"):
        mesh_lib.resolve_axis_sizes((-1, 3), 8)
    with pytest.raises(mesh_lib.MeshError, match="at most one axis"):
        mesh_lib.resolve_axis_sizes((-1, -1), 8)


def test_param_spec_rules():
    P = mesh_lib.P
    spec = lambda shape, **kw: mesh_lib.param_spec("p", shape, **{"fsdp_size": 4, **kw})
    assert spec((3, 3, 128, 256), strategy="replicated") == P()
    assert spec((3, 3, 128, 256), strategy="fsdp") == P(None, None, None, "fsdp")  # largest axis
    assert spec((3, 3, 128, 6), strategy="fsdp", min_size=1) == P(None, None, "fsdp", None)
    assert spec((256,), strategy="fsdp", min_size=1024) == P()  # small: replicated
    assert spec((), strategy="fsdp", min_size=0) == P()  # scalars: replicated
    assert spec((3, 3, 128, 256), strategy="fsdp", fsdp_size=1) == P()
    with pytest.raises(mesh_lib.MeshError, match=r"shape \(3, 3, 5, 7\) has no axis divisible"):
        spec((3, 3, 5, 7), strategy="fsdp", min_size=1)
    with pytest.raises(mesh_lib.MeshError, match="strategy 'zero3'"):
        spec((4,), strategy="zero3")


def test_launcher_combines_exit_codes_like_the_slurm_script():
    combine = launch_local.combine
    assert combine([0, 0]) == 0
    assert combine([1, -9]) == 1  # survivor's 1 first, the killed process counts as 137
    assert combine([0, -9]) == 137
    assert combine([1, 3]) == 3  # a NaN on one process explains the others' exit 1
    assert combine([75, 1]) == 75
    assert combine([2, 1]) == 2

"""Checkpoints, preemption and resume with real processes and real signals.

Every run goes through `python -m jcdm.dev.launch_local` on the smoke model, 2 processes x 2 CPU
devices with FSDP over all four (a 1x4 mesh spanning both processes: every sharded array is
split across the processes), unless said otherwise. One module-scoped fixture runs them all,
two at a time, because XLA:CPU compiles dominate (a launch whose program is not yet in the
persistent compile cache compiles it on both processes):

    ref:    uninterrupted, 6 steps, saves at 2, 4, 6
    kill:   SIGKILL of both processes while step 4 is being saved (started once ref's process
            0 has compiled: its program then comes from the compile cache)
    resume: restarts from step 2; SIGTERM to process 1 only mid-run -> exit 75 at step k
    finish: restarts from step k and ends at step 6                 } concurrently
    other:  ref's workdir with step 6 corrupted, on 1 process x 4    }
            devices with the state replicated (tests/test_multihost.py's 1x4 program), with
            NaNs injected into the batch of the second step after
            restoring: falls back to step 4, trains step 5, stops at step 6, exit 3

`train.curriculum_steps=8` makes the compiled train steps those of tests/test_multihost.py's
FSDP and 1x4 runs (the curriculum length is a constant of the program), so the file that runs
second reuses them from the persistent compilation cache.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jcdm import exit_codes
from tests.trainer import launch_local_argv

pytestmark = pytest.mark.slow

STEPS = 6
SAVE_EVERY = 2
TRAIN = [
    "--gin",
    "gin/smoke.gin",
    "--gin.EvalConfig.every=0",
    f"--gin.train.num_steps={STEPS}",
    "--gin.train.curriculum_steps=8",
    f"--gin.CheckpointConfig.save_every={SAVE_EVERY}",
    "--gin.state_shardings.strategy='fsdp'",
    "--gin.state_shardings.fsdp_min_size=256",  # smoke arrays are tiny: really shard them
]
MESH_2X2 = ["--gin.make_mesh.fsdp=4"]
MESH_1X4 = ["--gin.make_mesh.fsdp=1", "--gin.state_shardings.strategy='replicated'"]
NAN_AT = STEPS - 1  # state.step 5: the update that produces step 6 (a save step) is poisoned
TIMING_KEYS = ("images_per_sec", "compile_s")  # wall-clock values, not results
TIMEOUT_S = 420


class Launch:
    """One `jcdm.dev.launch_local` invocation whose output goes to a file we can poll."""

    def __init__(
        self, repo: str, name: str, workdir: str, args: list[str], *, num=2, devices=2
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.log_path = os.path.join(os.path.dirname(workdir), name + ".log")
        self.t0 = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                launch_local_argv(num, devices, [*TRAIN, *args], workdir),
                cwd=repo,
                env={**os.environ, "JAX_EXPLAIN_CACHE_MISSES": "true"},  # MISS lines, below
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.rc: int | None = None
        self.seconds = 0.0

    @property
    def out(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def pids(self) -> dict[int, int]:
        found = re.findall(r"\[launch\] process (\d+) pid (\d+)", self.out)
        return {int(i): int(p) for i, p in found}

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> Launch:
        try:
            self.rc = self.proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.name}: timed out after {TIMEOUT_S}s:\n{self.out[-4000:]}")
        self.seconds = time.monotonic() - self.t0
        print(f"\n{self.name}: exit {self.rc} after {self.seconds:.0f}s")
        return self

    def kill(self, sig: int, which: tuple[int, ...] | None = None) -> None:
        for i, pid in self.pids().items():
            if which is None or i in which:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def poll_until(self, condition, what: str, interval: float = 0.005) -> None:
        while not condition():
            if not self.running() or time.monotonic() - self.t0 > TIMEOUT_S:
                self.wait()
                pytest.fail(f"{self.name}: ended before {what}:\n{self.out[-4000:]}")
            time.sleep(interval)


def read_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def results(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def inspect_cli(repo: str, workdir: str, *args: str) -> str:
    """tools/inspect_checkpoint.py as users run it."""
    cmd = [sys.executable, "tools/inspect_checkpoint.py", workdir, *args]
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def inspect(workdir: str, step: int | None = None) -> dict:
    """The tool's --json content, computed in this process (no interpreter start-up per call)."""
    from tools import inspect_checkpoint

    return inspect_checkpoint.describe(workdir, step)


def committed_steps(workdir: str) -> list[int]:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit())


@dataclasses.dataclass
class Runs:
    ref: Launch
    kill: Launch
    killed_while_saving: int  # the step whose save was in flight at SIGKILL
    committed_at_kill: list[int]
    resume: Launch
    finish: Launch
    other: Launch
    other_workdir_before: list[int]


def _tmp_save_step(checkpoints: str) -> int | None:
    """The step of an unfinished save, from Orbax's temporary directory name, if any."""
    try:
        names = os.listdir(checkpoints)
    except FileNotFoundError:
        return None
    for name in names:
        if m := re.fullmatch(r"(\d+)\.orbax-checkpoint-tmp.*", name):
            return int(m[1])
    return None


def _corrupt(step_dir: str) -> None:
    """Overwrite the state's data files (OCDBT b-tree nodes and chunks, `d/*`) with garbage of
    the same length, as a bad disk or a torn copy would; names and metadata stay intact."""
    rng = np.random.default_rng(0)
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    assert files, step_dir
    for f in files:
        size = os.path.getsize(f)
        with open(f, "wb") as fh:
            fh.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def runs(repo, tmp_path_factory) -> Runs:
    base = tmp_path_factory.mktemp("checkpoint")
    started: list[Launch] = []

    def start(name: str, workdir: str, args: list[str], **kw) -> Launch:
        started.append(Launch(repo, name, workdir, args, **kw))
        return started[-1]

    try:
        ref = start("ref", str(base / "ref"), MESH_2X2)
        # Two processes compiling the same program at once would both miss the cache.
        compiled = lambda: re.search(r"\[p0\] .*train step compiled", ref.out)
        ref.poll_until(compiled, "process 0 compiled", interval=0.2)
        kill = start("kill", str(base / "chain"), MESH_2X2)
        # Host loss during a save: SIGKILL both processes while step >= 4 is being written
        # (its save starts only once the previous one is committed).
        chain_ckpts = os.path.join(kill.workdir, "checkpoints")
        kill.poll_until(
            lambda: (_tmp_save_step(chain_ckpts) or 0) >= 2 * SAVE_EVERY,
            "a save of step 4 or later was in flight",
        )
        killed_while_saving = _tmp_save_step(chain_ckpts) or 0
        kill.kill(signal.SIGKILL)
        kill.wait()
        committed_at_kill = committed_steps(kill.workdir)

        # Restart; once it has trained a step past the restored one (its progress line), SIGTERM
        # process 1 only.
        resume = start("resume", kill.workdir, MESH_2X2)
        resumed = lambda: re.search(r"resumed from step (\d+)", resume.out)
        resume.poll_until(resumed, "resuming", interval=0.2)
        first = int(resumed()[1])
        progress = lambda: [
            int(s) for s in re.findall(rf"\[p0\] \[#*-*\] (\d+)/{STEPS}", resume.out)
        ]
        resume.poll_until(lambda: any(s > first for s in progress()), "a step after resuming", 0.1)
        resume.kill(signal.SIGTERM, which=(1,))
        resume.wait()

        ref.wait()
        other_workdir = str(base / "other")
        shutil.copytree(ref.workdir, other_workdir)
        other_before = committed_steps(other_workdir)
        _corrupt(os.path.join(other_workdir, "checkpoints", str(STEPS)))
        nan = f"--gin.train.nan_at_step={NAN_AT}"
        other = start("other", other_workdir, [*MESH_1X4, nan], num=1, devices=4)
        finish = start("finish", kill.workdir, MESH_2X2)
        finish.wait()
        other.wait()
    finally:
        for launch in started:
            if launch.running():
                launch.kill(signal.SIGKILL)
    return Runs(
        ref, kill, killed_while_saving, committed_at_kill, resume, finish, other, other_before
    )


# --- SIGTERM, exit 75, resume, bitwise equal ------------------------------------------------------


def test_uninterrupted_reference_run(runs):
    assert runs.ref.rc == exit_codes.SUCCESS, runs.ref.out[-4000:]
    assert "exit codes [0, 0] -> 0" in runs.ref.out
    assert [r["step"] for r in read_rows(runs.ref.workdir)] == list(range(1, STEPS + 1))
    assert committed_steps(runs.ref.workdir) == [2, 4, 6]  # the final step is saved


def test_sigterm_to_one_process_saves_at_an_agreed_step_and_exits_75(runs):
    r = runs.resume
    out = r.out
    assert r.rc == exit_codes.PREEMPTED, out[-4000:]
    assert "exit codes [75, 75] -> 75" in out
    # Only process 1 got the signal; both stopped at the same step and say so.
    assert re.search(r"\[p1\] .*received SIGTERM", out) and not re.search(r"\[p0\].*SIGTERM", out)
    stops = {int(s) for s in re.findall(r"preempted: checkpoint at step (\d+) committed", out)}
    assert len(stops) == 1, out[-4000:]
    (k,) = stops
    start = int(re.search(r"resumed from step (\d+)", out)[1])
    assert start < k < STEPS
    assert k in committed_steps(r.workdir)  # saved at k even if k is off the save interval
    # The preemption checkpoint's metadata holds the metrics of step k itself.
    stored = inspect(r.workdir, k)["metrics"]
    assert stored["loss"] == read_rows(runs.ref.workdir)[k - 1]["loss"]


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one_bitwise(runs):
    assert runs.finish.rc == exit_codes.SUCCESS, runs.finish.out[-4000:]
    want = inspect(runs.ref.workdir)
    got = inspect(runs.finish.workdir)
    assert got["step"] == want["step"] == STEPS
    assert got["params_sha256"] == want["params_sha256"]
    assert got["ema_params_sha256"] == want["ema_params_sha256"]
    assert got["num_params"] == want["num_params"]
    # Same metrics, step by step, over the three runs (killed, preempted, finished): same data
    # order, noise and dropout. Rows the killed run wrote after its last checkpoint were dropped
    # on resume and recomputed.
    assert results(read_rows(runs.finish.workdir)) == results(read_rows(runs.ref.workdir))


def test_every_launch_after_the_first_hits_the_compile_cache_on_both_processes(runs):
    """The persistent compilation cache (jcdm.runtime.compile_cache) on a local directory: once
    the first launch's process 0 has compiled the step and written it (or an earlier test did),
    every later launch of the same program finds it, on process 1 too (its cache key must
    equal process 0's: JAX 0.10.2's CPU key differed between processes)."""
    miss = r"\[p{}\] .*PERSISTENT COMPILATION CACHE MISS for 'jit_train_step'"
    for launch in (runs.kill, runs.resume, runs.finish):
        for p in (0, 1):
            assert not re.search(miss.format(p), launch.out), (launch.name, launch.out[-3000:])
        assert re.search(r"\[p1\] .*train step compiled", launch.out), launch.name


# --- SIGKILL during a save ------------------------------------------------------------------------


def test_sigkill_during_a_save_restores_the_previous_checkpoint(runs):
    saving = runs.killed_while_saving
    assert saving >= 2 * SAVE_EVERY
    assert runs.kill.rc not in (0, exit_codes.PREEMPTED), runs.kill.out[-3000:]
    # The half-written step is not a checkpoint; the one before it is restored.
    previous = max(s for s in runs.committed_at_kill if s < saving)
    assert saving not in runs.committed_at_kill
    assert f"resumed from step {previous}" in runs.resume.out, runs.resume.out[-4000:]
    assert "unreadable" not in runs.resume.out


# --- corrupted latest checkpoint, another mesh, NaN -----------------------------------------------


def test_corrupted_latest_checkpoint_falls_back_to_the_one_before(runs):
    out = runs.other.out
    assert runs.other_workdir_before == [2, 4, 6]
    assert re.search(rf"checkpoint at step {STEPS} in .* is unreadable", out), out[-4000:]
    assert f"resumed from step {STEPS - 2}" in out
    aside = glob.glob(os.path.join(runs.other.workdir, "checkpoints_unreadable", f"{STEPS}-*"))
    assert len(aside) == 1, os.listdir(runs.other.workdir)


def test_restore_onto_a_different_mesh_continues_the_run(runs):
    """Saved sharded over 2 processes x 2 devices (FSDP 4), restored replicated on 1 process x 4
    devices (every shard now read by one process): the step after restoring gives the
    reference run's metrics up to float reduction order (measured ~1e-6 relative)."""
    out = runs.other.out
    assert "process 0/1 mesh {'data': 4, 'fsdp': 1}" in out
    assert "process 1/2 mesh {'data': 1, 'fsdp': 4}" in runs.ref.out
    rows = {r["step"]: r for r in read_rows(runs.other.workdir)}
    ref = {r["step"]: r for r in read_rows(runs.ref.workdir)}
    assert max(rows) == STEPS - 1  # step 5 trained and logged; step 6 was the poisoned one
    for key in ("loss", "loss_ct", "loss_dsm", "grad_norm", "num_scales"):
        np.testing.assert_allclose(rows[STEPS - 1][key], ref[STEPS - 1][key], rtol=1e-4)


def test_nan_stops_the_run_without_writing_a_checkpoint_of_the_broken_state(runs):
    out = runs.other.out
    assert runs.other.rc == exit_codes.NUMERICAL, out[-4000:]
    assert f"non-finite loss or gradient at step {NAN_AT}" in out
    assert "no checkpoint of the broken state was written" in out
    # Step 6 was due for a save but was not written; the last good checkpoint is intact.
    assert committed_steps(runs.other.workdir) == [2, 4]
    names = os.listdir(os.path.join(runs.other.workdir, "checkpoints"))
    assert not [n for n in names if "tmp" in n], names
    kept, original = inspect(runs.other.workdir, 4), inspect(runs.ref.workdir, 4)
    assert kept["params_sha256"] == original["params_sha256"]
    assert kept["ema_params_sha256"] == original["ema_params_sha256"]


# --- the inspect tool -----------------------------------------------------------------------------


def test_inspect_checkpoint_text_and_json(repo, runs, capsys):
    info = json.loads(inspect_cli(repo, runs.ref.workdir, "--json"))
    assert info == inspect(runs.ref.workdir)
    assert {"step", "num_params", "params_sha256", "metrics"} <= set(info)
    assert info["steps"] == [2, 4, 6] and info["step"] == STEPS
    assert re.fullmatch(r"[0-9a-f]{64}", info["params_sha256"])
    assert info["metrics"]["loss"] == read_rows(runs.ref.workdir)[-1]["loss"]
    params = re.search(
        r"parameters: \{'backbone': '([\d.]+)M', 'head': '([\d.]+)M'\}", runs.ref.out
    )
    assert info["num_params"] == pytest.approx(
        (float(params[1]) + float(params[2])) * 1e6, abs=0.02e6
    )
    older = inspect(runs.ref.workdir, 2)
    assert older["step"] == 2 and older["params_sha256"] != info["params_sha256"]
    from tools import inspect_checkpoint

    inspect_checkpoint.main([runs.ref.workdir])  # the text form, in this process
    text = capsys.readouterr().out
    assert "checkpoints: [2, 4, 6]" in text
    assert f"step {STEPS}: {info['num_params']:,} parameters" in text
    assert info["params_sha256"] in text


def test_restore_in_this_process_onto_one_device_is_bit_identical(runs):
    """Restore the 2x2-sharded state with explicit 1x1 target shardings through the trainer's
    Checkpointer and hash it like the tool does."""
    import jax
    import orbax.checkpoint as ocp

    from jcdm.runtime import checkpoint as ckpt_lib
    from tools.inspect_checkpoint import params_digest

    ckpt_dir = os.path.join(runs.ref.workdir, "checkpoints")
    meta = ocp.StandardCheckpointer().metadata(os.path.join(ckpt_dir, str(STEPS), "state"))
    tree = meta.item_metadata.tree
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=rep), tree)
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, ckpt_lib.CheckpointConfig(async_save=False))
    try:
        state = ckpt.restore(STEPS, target)
    finally:
        ckpt.close()
    leaf = jax.tree.leaves(state["params"])[0]
    assert leaf.sharding == rep
    assert params_digest(state["params"])[1] == inspect(runs.ref.workdir)["params_sha256"]

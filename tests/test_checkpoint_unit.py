"""The Checkpointer, preemption watcher and metrics file in this process, on tiny states (fast).

The end-to-end behaviour with real trainer processes and signals is in tests/test_checkpoint.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jcdm.runtime import checkpoint as ckpt_lib
from jcdm.runtime import preemption, reporting


class FakeIterator:
    def __init__(self, next_batch: int = 0):
        self.next_batch = next_batch

    def get_state(self) -> dict:
        return {"next_batch": self.next_batch}

    def set_state(self, state: dict) -> None:
        self.next_batch = state["next_batch"]


def make_state(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "params": {"w": jax.random.normal(k1, (64, 32)), "b": jax.random.normal(k2, (32,))},
        "step": jnp.asarray(seed, jnp.int32),
    }


def abstract(state) -> dict:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def checkpointer(directory, **cfg) -> ckpt_lib.Checkpointer:
    return ckpt_lib.Checkpointer(str(directory), ckpt_lib.CheckpointConfig(**cfg))


def same(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_background_save_is_unaffected_by_donating_the_state_right_after(tmp_path):
    """The training loop donates the state to the next update as soon as `save` returns; the
    saved values must be those at the save, bit for bit."""
    update = jax.jit(lambda s: jax.tree.map(lambda x: x * 3 + 1, s), donate_argnums=0)
    state = make_state(1)
    target = abstract(state)
    expected = {}
    ckpt = checkpointer(tmp_path, save_every=1)
    try:
        for step in (1, 2, 3):
            expected[step] = jax.tree.map(np.array, state)  # a host copy, before the save
            assert ckpt.save(step, state, FakeIterator(step), force=True)
            state = update(state)  # donates the buffers the save was given
            state = update(state)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2, 3]
        for step in (1, 2, 3):
            it = FakeIterator()
            assert same(ckpt.restore(step, target, it), expected[step])
            assert it.next_batch == step
    finally:
        ckpt.close()


def test_the_array_handler_is_orbax_s_default_but_for_the_slice_threshold(tmp_path):
    """CheckpointConfig.replica_parallel_min_bytes replaces Orbax's registered jax.Array handler;
    the replacement must still write Orbax's per-array metadata (array_metadatas/)."""
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False, replica_parallel_min_bytes=4096)
    try:
        ckpt.save(1, make_state(0), FakeIterator(1), force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    assert list((tmp_path / "1" / "state").glob("array_metadatas/*")), os.listdir(tmp_path / "1")
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    assert handler._min_slice_bytes_for_replica_parallel == 4096


@pytest.mark.parametrize("mode", ["background", "orbax_async", "sync"])
def test_every_save_mode_restores_bit_exactly(tmp_path, mode):
    cfg = {
        "background": dict(async_save=True, background=True),
        "orbax_async": dict(async_save=True, background=False),
        "sync": dict(async_save=False),
    }[mode]
    state = make_state(2)
    ckpt = checkpointer(tmp_path, save_every=1, **cfg)
    try:
        ckpt.save(5, state, FakeIterator(7), force=True, metrics={"loss": 1.5})
        ckpt.wait()
        it = FakeIterator()
        restored, step = ckpt.restore_latest(abstract(state), it)
    finally:
        ckpt.close()
    assert step == 5 and it.next_batch == 7 and same(restored, state)
    meta = json.loads((tmp_path / "5" / "meta" / "metadata").read_text())
    assert meta == {"step": 5, "metrics": {"loss": 1.5}}


def test_save_interval_policy_and_keep(tmp_path):
    state = make_state()
    ckpt = checkpointer(tmp_path, save_every=3, keep=2)
    try:
        started = [s for s in range(1, 10) if ckpt.save(s, state, FakeIterator(s))]
        ckpt.save(10, state, FakeIterator(10), force=True)  # e.g. the final or a preemption step
        ckpt.wait()
        assert started == [3, 6, 9]
        assert ckpt.all_steps() == [9, 10]
    finally:
        ckpt.close()


def test_keep_best_fid_survives_a_restart(tmp_path):
    """keep=1 latest plus the 2 lowest-FID checkpoints among those saved with an FID; a
    checkpoint without FID is only kept while it is the latest. The ranking is read back after a
    restart (Orbax stores it only when told to)."""
    state = make_state()
    fids = {1: 5.0, 2: 3.0, 3: None, 4: 1.0, 5: 6.0}
    ckpt = checkpointer(tmp_path, save_every=1, keep=1, keep_best_fid=2, async_save=False)
    try:
        for step, fid in fids.items():
            metrics = {"loss": 0.1} if fid is None else {"loss": 0.1, "fid_1step": fid}
            ckpt.save(step, state, FakeIterator(step), force=True, metrics=metrics)
        assert ckpt.all_steps() == [2, 4, 5]
    finally:
        ckpt.close()
    ckpt = checkpointer(tmp_path, save_every=1, keep=1, keep_best_fid=2, async_save=False)
    try:
        ckpt.save(6, state, FakeIterator(6), force=True, metrics={"fid_1step": 2.0})
        ckpt.save(7, state, FakeIterator(7), force=True, metrics={"fid_1step": float("nan")})
        assert ckpt.all_steps() == [4, 6, 7]
    finally:
        ckpt.close()


def test_best_step_reads_the_stored_metrics(tmp_path):
    state = make_state()
    ckpt = checkpointer(tmp_path, save_every=1, keep=5, async_save=False)
    try:
        assert ckpt.best_step() is None
        for step, fid in {1: 4.0, 2: 2.5, 3: 2.5, 4: float("nan"), 5: None}.items():
            metrics = {"loss": 1.0} if fid is None else {"fid_1step": fid}
            ckpt.save(step, state, FakeIterator(step), force=True, metrics=metrics)
        assert ckpt.best_step() == 2  # lowest; the tie goes to the step that measured it
        assert ckpt.stored_metrics(5) == {"loss": 1.0}
        assert ckpt.best_step("loss") == 5
    finally:
        ckpt.close()


def test_unfinished_save_is_never_listed_or_restored(tmp_path):
    """What a process killed mid-save leaves behind: Orbax's temporary directory."""
    state = make_state(3)
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.save(1, state, FakeIterator(1), force=True)
    ckpt.save(2, make_state(4), FakeIterator(2), force=True)
    ckpt.close()
    os.rename(tmp_path / "2", tmp_path / "2.orbax-checkpoint-tmp-1234567")
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False)
    try:
        assert ckpt.all_steps() == [1]
        restored, step = ckpt.restore_latest(abstract(state), FakeIterator())
        assert step == 1 and same(restored, state)
        ckpt.save(2, state, FakeIterator(2), force=True)  # the step can be saved again
        assert ckpt.all_steps() == [1, 2]
    finally:
        ckpt.close()


def test_unreadable_latest_falls_back_and_is_moved_aside(tmp_path, caplog):
    ckdir = tmp_path / "checkpoints"
    state = make_state(5)
    ckpt = checkpointer(ckdir, save_every=1, async_save=False)
    ckpt.save(1, state, FakeIterator(1), force=True)
    ckpt.save(2, make_state(6), FakeIterator(2), force=True)
    ckpt.close()
    for f in (ckdir / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * f.stat().st_size)
    ckpt = checkpointer(ckdir, save_every=1, async_save=False)
    try:
        with caplog.at_level(logging.ERROR, logger="jcdm.runtime.checkpoint"):
            restored, step = ckpt.restore_latest(abstract(state), FakeIterator())
        assert step == 1 and same(restored, state)
        assert "checkpoint at step 2" in caplog.text and "unreadable" in caplog.text
        assert ckpt.all_steps() == [1]
        assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_unreadable").iterdir()] == [
            "2"
        ]
        ckpt.save(2, state, FakeIterator(2), force=True)  # the resumed run saves step 2 again
        assert ckpt.all_steps() == [1, 2]
    finally:
        ckpt.close()


def test_a_checkpoint_of_another_model_is_a_mismatch_and_moves_nothing(tmp_path):
    """Checkpoints whose parameter names or shapes differ from the model are a configuration
    error (exit 2 in the trainer), said with the first differences; nothing is moved aside."""
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.save(1, make_state(), FakeIterator(1), force=True)
    ckpt.close()
    wrong = abstract(make_state())
    wrong["params"]["w"] = jax.ShapeDtypeStruct((64, 16), jnp.float32)  # another width
    wrong["params"]["extra"] = jax.ShapeDtypeStruct((3,), jnp.float32)
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False)
    try:
        with pytest.raises(ckpt_lib.CheckpointMismatch) as info:
            ckpt.restore_latest(wrong)
        msg = str(info.value)
        assert "step 1" in msg and "written by another configuration" in msg
        assert "params.extra missing" in msg and "params.w stored (64, 32), model (64, 16)" in msg
        assert ckpt.all_steps() == [1]
    finally:
        ckpt.close()
    assert not (tmp_path.parent / (tmp_path.name + "_unreadable")).exists()


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.save(1, make_state(), FakeIterator(1), force=True)
    ckpt.close()
    for f in (tmp_path / "1" / "state").rglob("*"):  # every file of the state, metadata too
        if f.is_file():
            f.write_bytes(b"garbage")
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False)
    try:
        with pytest.raises(ckpt_lib.CheckpointError, match="none of the checkpoints") as info:
            ckpt.restore_latest(abstract(make_state()))
        assert not isinstance(info.value, ckpt_lib.CheckpointMismatch)  # retryable, exit 1
        assert ckpt.all_steps() == [1]
    finally:
        ckpt.close()
    assert not (tmp_path.parent / (tmp_path.name + "_unreadable")).exists()


def test_empty_directory_restores_nothing(tmp_path):
    ckpt = checkpointer(tmp_path / "none")
    try:
        assert ckpt.restore_latest(abstract(make_state())) == (None, None)
    finally:
        ckpt.close()


def test_a_failed_background_save_is_raised_by_the_next_call(tmp_path, monkeypatch):
    ckpt = checkpointer(tmp_path, save_every=1)
    try:
        ckpt.save(1, {"x": jnp.ones(3)}, FakeIterator(1), force=True)
        ckpt.wait()

        def failing_write(*args):  # the background thread's write fails (e.g. a lost disk)
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(ckpt, "_save_now", failing_write)
        ckpt.save(2, {"x": jnp.ones(3)}, FakeIterator(2), force=True)  # returns: in a thread
        with pytest.raises(ckpt_lib.CheckpointError, match=r"step 2 .* Input/output error"):
            ckpt.wait()
    finally:
        ckpt.close()  # the error was raised once; closing does not raise it again


@contextlib.contextmanager
def unwritable(path):
    """`path` made unwritable for this process, root included (chattr +i), else chmod."""
    if os.geteuid() == 0:
        r = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot make {path} immutable as root: {r.stderr.decode()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


def test_a_save_into_an_unwritable_directory_names_the_path_and_keeps_the_last_checkpoint(
    tmp_path,
):
    """Item 4: the error names the step, the directory and the OS error, comes at the save (every
    process writes a probe file first), is not raised twice, and the checkpoint before stays
    restorable."""
    state = make_state()
    ckpt = checkpointer(tmp_path, save_every=1)
    try:
        ckpt.save(1, state, FakeIterator(1), force=True)
        ckpt.wait()
        with unwritable(tmp_path), pytest.raises(ckpt_lib.CheckpointError) as info:
            ckpt.save(2, state, FakeIterator(2), force=True)
        msg = str(info.value)
        assert "step 2" in msg and str(tmp_path) in msg, msg
        assert "PermissionError" in msg or "Permission denied" in msg, msg
        assert "the previous checkpoint (step 1) is kept" in msg
    finally:
        ckpt.close()  # logs, does not raise the error again
    again = checkpointer(tmp_path)
    try:
        restored, step = again.restore_latest(abstract(state), FakeIterator())
        assert step == 1 and same(restored, state)
        with pytest.raises(ckpt_lib.CheckpointError, match="final checkpoint .step 2. is not"):
            again.require_committed(2)
        again.require_committed(1)
    finally:
        again.close()


def test_sigterm_is_recorded_not_fatal_and_jax_notifier_is_off():
    assert preemption.active() is None
    watcher = preemption.install()
    try:
        assert preemption.install() is watcher  # one per process
        assert jax.config.jax_enable_preemption_service is False
        assert not watcher.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # handled in Python: this test keeps running
        # Counted by the watcher's wakeup-pipe reader thread, so noticed a moment later.
        deadline = time.monotonic() + 5
        while not watcher.local_notice and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watcher.local_notice and watcher.should_stop()
        assert not watcher.interrupted  # a preemption notice, not the user's Ctrl-C
    finally:
        preemption.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert preemption.active() is None


def test_metrics_rows_past_the_restored_step_are_dropped(tmp_path):
    rows = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 6, "lo')  # torn
    reporter = reporting.Reporter(
        str(tmp_path), enabled=True, num_steps=10, run_id="x", resume_step=3
    )
    reporter.write_metrics(4, {"loss": 40.0})
    reporter.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == [{"step": s, "loss": float(s)} for s in (1, 2, 3)] + [{"step": 4, "loss": 40.0}]


CHILD = """
import sys, time
import jax, jax.numpy as jnp
from jcdm.runtime import preemption
watcher = preemption.install()
print("ready", flush=True)
t0 = time.perf_counter()
# A few seconds inside XLA (C++): Python runs the handler only once the compile returns.
f = lambda x: jax.lax.fori_loop(0, 3, lambda i, a: jnp.tanh(a @ a.T + i), x)
for n in range(4):
    jax.jit(f).lower(jnp.ones((8 + n, 8 + n))).compile()
print("compiled", round(time.perf_counter() - t0, 1), "stop", watcher.should_stop(), flush=True)
"""


@pytest.mark.slow  # starts a process
def test_sigterm_during_compilation_is_kept(repo):
    """A real process: SIGTERM while XLA compiles neither kills it nor gets lost."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], cwd=repo, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert out.strip().endswith("stop True"), out

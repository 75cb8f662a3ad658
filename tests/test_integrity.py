"""What is restored is what was saved: the checkpoint hash manifest, in this process (fast).

The trainer's side (a flipped byte in a real smoke checkpoint, and the resumed run ending
bitwise equal to an uninterrupted one) is `test_a_flipped_byte_never_reaches_training` in
tests/test_integrity_trainer.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jcdm.runtime import checkpoint as ckpt_lib
from jcdm.runtime import integrity, quiet_loops
from tests.test_checkpoint_unit import FakeIterator, abstract, checkpointer, same


def _state(seed: int) -> dict:
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "params": {
            "w": jax.random.normal(k[0], (48, 40)),
            "b": jax.random.normal(k[1], (40,)).astype(jnp.bfloat16),
        },
        "opt": [jax.random.uniform(k[2], (7, 3, 5)), jnp.zeros((4,), jnp.float32)],
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.PRNGKey(seed),  # uint32[2]
    }


@pytest.mark.parametrize(
    "dtype", [np.float32, np.int32, np.uint32, ml_dtypes.bfloat16, np.float64, np.bool_]
)
def test_the_hash_adds_up_over_any_blocks_and_sees_one_changed_element(dtype):
    """Shards of any mesh are blocks of the global array: the sum of their contributions is the
    whole array's hash, so save and restore on different meshes agree."""
    rng = np.random.default_rng(0)
    normal = rng.standard_normal((9, 10, 6))
    full = (normal > 0) if dtype is np.bool_ else (normal * 100).astype(dtype)
    whole = integrity.element_word_sum(full, (0, 0, 0), full.shape)
    for cuts in ([(0, 9)], [(0, 4), (4, 9)], [(0, 1), (1, 2), (2, 9)]):
        for cuts1 in ([(0, 10)], [(0, 3), (3, 10)]):
            total = 0
            for a, b in cuts:
                for c, d in cuts1:
                    total += integrity.element_word_sum(full[a:b, c:d], (a, c, 0), full.shape)
            assert total % (1 << 64) == whole
    changed = full.copy()
    flat = changed.reshape(-1)
    flat[123] = flat[122] if flat[123] != flat[122] else flat[124]
    assert integrity.element_word_sum(changed, (0, 0, 0), full.shape) != whole
    # Position matters: the same values in another order hash differently.
    assert integrity.element_word_sum(full[::-1].copy(), (0, 0, 0), full.shape) != whole


def test_large_blocks_are_hashed_in_chunks_alike():
    """Arrays above the chunk size take the chunked paths; their hash equals the block sum of
    small pieces (each piece takes the vectorised path)."""
    rng = np.random.default_rng(1)
    big = rng.integers(0, 2**32, (3, 300, 300), dtype=np.uint32)
    whole = integrity.element_word_sum(big, (0, 0, 0), big.shape)
    pieces = sum(
        integrity.element_word_sum(big[i : i + 1, j : j + 50], (i, j, 0), big.shape)
        for i in range(3)
        for j in range(0, 300, 50)
    )
    assert pieces % (1 << 64) == whole
    flat = big.reshape(-1)
    # The hash follows the flat (C-order) index; the manifest records the shape beside it.
    assert integrity.element_word_sum(flat, (0,), flat.shape) == whole


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_one_byte_change_anywhere_in_the_newest_checkpoint_never_reaches_the_caller(
    tmp_path, caplog
):
    """Done-when of issue 19, in this process: a one-byte change in the middle of every file of
    the newest checkpoint (and at the start and end of each array data file) either fails
    verification (step 1 is restored and the damaged step moved aside) or restores values
    bitwise equal to those saved."""
    pristine = tmp_path / "pristine"
    states = {1: _state(1), 2: _state(2)}
    ckpt = checkpointer(pristine, save_every=1, async_save=False)
    for step, state in states.items():
        ckpt.save(step, state, FakeIterator(10 * step), force=True, metrics={"loss": 0.5 * step})
    ckpt.close()
    files = sorted(p for p in (pristine / "2").rglob("*") if p.is_file())
    assert len(files) >= 10, files
    target = abstract(states[1])
    outcomes: dict[str, int] = {"fell back": 0, "equal": 0}
    fell_back_files = set()
    for f in files:
        rel = f.relative_to(pristine)
        size = f.stat().st_size
        data_file = rel.parent.name == "d"
        for offset in sorted({0, size // 2, size - 1} if data_file else {size // 2}):
            work = tmp_path / "work" / "checkpoints"
            shutil.rmtree(tmp_path / "work", ignore_errors=True)
            shutil.copytree(pristine, work)
            _flip(work / rel, offset)
            it = FakeIterator()
            ckpt = checkpointer(work, save_every=1, async_save=False)
            try:
                with caplog.at_level(logging.ERROR, logger="jcdm.runtime.checkpoint"):
                    restored, step = ckpt.restore_latest(target, it)
                listed = ckpt.all_steps()
            finally:
                ckpt.close()
            where = f"{rel} byte {offset}"
            assert step in (1, 2), where
            assert same(restored, states[step]), where
            assert it.next_batch == 10 * step, where
            if step == 1:
                outcomes["fell back"] += 1
                fell_back_files.add(str(rel))
                assert listed == [1], where
                aside = list((tmp_path / "work" / "checkpoints_unreadable").iterdir())
                assert [p.name.split("-")[0] for p in aside] == ["2"], where
            else:
                outcomes["equal"] += 1
                assert ckpt_lib.Checkpointer(work).stored_metrics(2) == {"loss": 1.0}, where
    print(outcomes, sorted(fell_back_files))
    # Every file holding array data or the JSON items is among those whose change is caught.
    for needed in ("hashes/metadata", "data/metadata", "meta/metadata"):
        assert f"2/{needed}" in fell_back_files
    assert any("ocdbt.process_0/d/" in f for f in fell_back_files)
    assert "differ from the hashes saved with it" in caplog.text


def test_verification_failure_is_reported_by_restore_and_the_tool_names_the_leaf(tmp_path):
    """A value changed behind Orbax's back (a valid file with other contents): `restore` of that
    step raises, naming the array; `restore_latest` falls back."""
    ckdir = tmp_path / "checkpoints"
    ckpt = checkpointer(ckdir, save_every=1, async_save=False)
    ckpt.save(1, _state(1), FakeIterator(1), force=True)
    ckpt.save(2, _state(2), FakeIterator(2), force=True)
    ckpt.close()
    manifest_path = ckdir / "2" / integrity.ITEM / "metadata"
    found = json.loads(manifest_path.read_text())
    found["arrays"]["params.w"]["hash"] = "0" * 16  # as if the values had changed
    manifest_path.write_text(json.dumps(found))
    ckpt = checkpointer(ckdir, save_every=1, async_save=False)
    try:
        with pytest.raises(ckpt_lib.CheckpointError, match=r"params\.w: hash [0-9a-f]{16}"):
            ckpt.restore(2, abstract(_state(2)))
        assert ckpt.all_steps() == [1, 2]  # an explicit restore moves nothing
        _, step = ckpt.restore_latest(abstract(_state(2)))
        assert step == 1 and ckpt.all_steps() == [1]
    finally:
        ckpt.close()


def test_a_checkpoint_without_a_manifest_restores_with_a_warning(tmp_path, caplog):
    """Checkpoints saved before manifests existed stay restorable."""
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.save(1, _state(1), FakeIterator(1), force=True)
    ckpt.close()
    shutil.rmtree(tmp_path / "1" / integrity.ITEM)
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False)
    try:
        with caplog.at_level(logging.WARNING, logger="jcdm.runtime"):
            restored, step = ckpt.restore_latest(abstract(_state(1)))
        assert step == 1 and same(restored, _state(1))
        assert "no hash manifest" in caplog.text
    finally:
        ckpt.close()


def test_an_unreadable_checkpoint_prints_no_event_loop_tracebacks(tmp_path, capfd):
    """Orbax closes its event loop at the first failed read; each other read still in flight
    used to print an 'Event loop is closed' traceback from TensorStore's thread when it ended.
    How many are in flight is a race: restore copies of a damaged checkpoint until some were."""
    pristine = tmp_path / "pristine"
    ckpt = checkpointer(pristine, save_every=1, async_save=False)
    big = {f"a{i}": jnp.full((64, 64), float(i)) for i in range(40)}
    ckpt.save(1, big, FakeIterator(1), force=True)
    ckpt.save(2, big, FakeIterator(2), force=True)
    ckpt.close()
    for f in (pristine / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * f.stat().st_size)
    before = quiet_loops.dropped
    for attempt in range(8):
        work = tmp_path / f"work{attempt}"
        shutil.copytree(pristine, work)
        ckpt = checkpointer(work, save_every=1, async_save=False)
        try:
            _, step = ckpt.restore_latest(abstract(big))
        finally:
            ckpt.close()
        assert step == 1
        time.sleep(0.3)  # the abandoned reads end in TensorStore's threads
        if quiet_loops.dropped > before:
            break
    assert quiet_loops.dropped > before, "no read was in flight when the loop closed: rerun"
    assert "Event loop is closed" not in capfd.readouterr().err


def test_metadata_that_contradicts_the_manifest_is_damage_not_another_configuration(tmp_path):
    """A shape in the stored metadata that differs from the model would read as a checkpoint
    of another configuration (exit 2, no fallback); when the checkpoint's own manifest
    disagrees with its metadata, it is damage, and the run falls back."""
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.save(1, _state(1), FakeIterator(1), force=True)
    ckpt.save(2, _state(2), FakeIterator(2), force=True)
    ckpt.close()
    wrong = abstract(_state(1))
    wrong["params"]["w"] = jax.ShapeDtypeStruct((48, 20), jnp.float32)
    # Step 2's manifest says what this model has: its metadata (48, 40) is the odd one out.
    path = tmp_path / "2" / integrity.ITEM / "metadata"
    found = json.loads(path.read_text())
    found["arrays"]["params.w"]["shape"] = [48, 20]
    path.write_text(json.dumps(found))
    ckpt = checkpointer(tmp_path, save_every=1, async_save=False)
    try:
        with pytest.raises(ckpt_lib.CheckpointMismatch, match="checkpoint at step 1 "):
            ckpt.restore_latest(wrong)  # step 2 skipped as damaged; step 1 is a real mismatch
    finally:
        ckpt.close()


def test_inspect_checkpoint_verifies_falls_back_and_moves_nothing(tmp_path, capsys):
    """The tool reports a damaged newest step (garbage metadata: once an AttributeError) and
    describes the newest intact one; a damaged --step N is an error; nothing is moved."""
    from tools import inspect_checkpoint

    ckdir = tmp_path / "checkpoints"
    ckpt = checkpointer(ckdir, save_every=1, async_save=False)
    for step in (1, 2, 3):
        s = _state(step)
        state = {"params": s["params"], "ema_params": s["params"], "step": s["step"]}
        ckpt.save(step, state, FakeIterator(step), force=True)
    ckpt.close()
    (ckdir / "3" / "state" / "_METADATA").write_bytes(b"\x00garbage")
    manifest_path = ckdir / "2" / integrity.ITEM / "metadata"
    found = json.loads(manifest_path.read_text())
    found["arrays"]["params.b"]["hash"] = "0" * 16
    manifest_path.write_text(json.dumps(found))
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    info = inspect_checkpoint.describe(str(tmp_path))
    assert info["step"] == 1 and info["verified"] is True and info["steps"] == [1, 2, 3]
    assert set(info["damaged"]) == {"3", "2"}
    assert "unreadable" in info["damaged"]["3"] and "params.b: hash" in info["damaged"]["2"]
    err = capsys.readouterr().err
    assert "checkpoint 3 is damaged" in err and "checkpoint 2 is damaged" in err
    with pytest.raises(SystemExit, match="no intact checkpoint"):
        inspect_checkpoint.describe(str(tmp_path), step=3)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing

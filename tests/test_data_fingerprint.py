"""A run knows its data: the checkpointed iterator state names the dataset by a fingerprint.

The trainer's side (exit 2 before config.gin is rewritten) is in
tests/test_integrity_trainer.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jcdm.data import DataError, make_train_iterator, write_image_records
from jcdm.data.records import METADATA_FILE


def _write(out, seed: int, n: int = 24):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    write_image_records(
        out,
        [(images, np.zeros(n, np.int32))],
        num_records=n,
        image_shape=(8, 8, 3),
        num_shards=2,
        split="train",
        name=f"set{seed}",
    )
    return str(out)


def _iterator(dataset: str):
    return make_train_iterator(
        dataset=dataset, global_batch_size=4, seed=0, process_index=0, process_count=1
    )


def test_another_dataset_of_the_same_size_and_shape_is_refused_naming_both(tmp_path):
    a, b = _write(tmp_path / "a", seed=1), _write(tmp_path / "b", seed=2)
    it = _iterator(a)
    next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    assert state["dataset_fingerprint"].startswith("v1:")
    with pytest.raises(DataError) as info:
        _iterator(b).set_state(state)
    msg = str(info.value)
    assert str(tmp_path / "a") in msg and str(tmp_path / "b") in msg
    assert "another dataset" in msg and "fresh workdir" in msg and "DATA_DIR" in msg
    # The same contents elsewhere (a copy) are the same dataset.
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    resumed = _iterator(str(tmp_path / "copy"))
    resumed.set_state(state)
    assert resumed.get_state()["next_batch"] == 1


def test_the_fingerprint_follows_the_shard_checksums_and_old_states_still_resume(tmp_path):
    a = _write(tmp_path / "a", seed=1)
    first = _iterator(a).get_state()["dataset_fingerprint"]
    meta_path = tmp_path / "a" / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["shards"][1]["sha256"] = "0" * 64  # what a rebuilt shard with other bytes records
    meta_path.write_text(json.dumps(meta))
    changed = make_train_iterator(
        dataset=a,
        global_batch_size=4,
        seed=0,
        process_index=0,
        process_count=1,
        verify_checksums=False,
    )
    assert changed.get_state()["dataset_fingerprint"] != first
    # Metadata without checksums (older converters) still opens and fingerprints.
    for shard in meta["shards"]:
        del shard["sha256"]
    meta_path.write_text(json.dumps(meta))
    old = make_train_iterator(
        dataset=a,
        global_batch_size=4,
        seed=0,
        process_index=0,
        process_count=1,
        verify_checksums=False,
    )
    assert old.get_state()["dataset_fingerprint"] not in (first, None)
    # A state saved before fingerprints existed resumes (nothing to compare it with).
    legacy = {
        k: v
        for k, v in _iterator(_write(tmp_path / "c", seed=3)).get_state().items()
        if k not in ("dataset", "dataset_fingerprint")
    }
    legacy["next_batch"] = 3
    it = _iterator(_write(tmp_path / "b", seed=2))
    it.set_state(legacy)
    assert it.get_state()["next_batch"] == 3


def test_generated_datasets_are_fingerprinted_by_what_defines_them():
    def fp(dataset: str) -> str:
        return _iterator(dataset).get_state()["dataset_fingerprint"]

    assert fp("synthetic:8x8x3:40") == fp("synthetic:8x8x3:40")
    assert fp("synthetic:8x8x3:40") != fp("synthetic:8x8x3:48")
    assert fp("digits") == fp("digits") != fp("synthetic:16x16x1:1797")

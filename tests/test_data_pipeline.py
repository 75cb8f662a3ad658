"""The training stream: global shuffling, process sharding, flips, determinism, save/restore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gin
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jcdm.data import DataError, dataset_spec, make_train_iterator
from jcdm.data.pipeline import buffer_shuffle_order

ROOT = Path(__file__).resolve().parents[1]
DATA = "synthetic:8x8x3:40"  # 40 records: epochs are short, batches straddle their boundaries


def _iterator(**overrides):
    kwargs = dict(
        dataset=DATA, global_batch_size=8, seed=3, process_index=0, process_count=1,
        with_record_index=True,
    )  # fmt: skip
    kwargs.update(overrides)
    return make_train_iterator(**kwargs)


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _stack(batches, key: str) -> np.ndarray:
    return np.concatenate([b[key] for b in batches])


def test_batches_have_the_contract_shape_and_range():
    batch = next(_iterator(global_batch_size=12, process_count=2, process_index=1))
    image = batch["image"]
    assert image.shape == (6, 8, 8, 3) and image.dtype == np.float32
    assert -1.0 <= image.min() < 0 < image.max() <= 1.0
    assert dataset_spec(DATA).shape == (8, 8, 3) and dataset_spec(DATA).num_records == 40
    assert dataset_spec("synthetic", image_size=32).shape == (32, 32, 3)


@pytest.mark.parametrize("shuffle", ["global", "buffer"])
def test_each_epoch_is_a_new_permutation(shuffle):
    # G = 12 does not divide N = 40: epochs start inside batches, and must still be permutations.
    it = _iterator(global_batch_size=12, shuffle=shuffle, shuffle_buffer_size=10)
    stream = _stack(_take(it, 10), "record_index")  # 120 positions = 3 epochs
    epochs = stream.reshape(3, 40)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(40))
    assert len({tuple(e) for e in epochs}) == 3
    if shuffle == "global":
        assert not np.array_equal(epochs[0], np.arange(40))
    else:  # a 10-slot buffer only reorders locally: output k comes from records [0, k + 10)
        assert np.all(epochs <= np.arange(40) + 9)


def test_buffer_shuffle_matches_its_definition():
    order = buffer_shuffle_order(5000, 1000, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(5000))
    assert np.all(order < np.arange(5000) + 1000)
    assert order[:1000].mean() > 400  # the first outputs are drawn from the whole first buffer


def test_processes_get_disjoint_shares_that_cover_the_epoch():
    # G = 8 divides N = 40: five steps are exactly one epoch.
    shares = [
        _stack(_take(_iterator(process_count=2, process_index=p), 5), "record_index")
        for p in (0, 1)
    ]
    assert set(shares[0].tolist()).isdisjoint(shares[1].tolist())
    assert sorted(np.concatenate(shares).tolist()) == list(range(40))


def test_process_shares_concatenate_to_the_one_process_batch():
    """Process p's batch is rows [p*L, (p+1)*L) of the one-process batch, flips included."""
    steps = 8  # 8 * 12 = 96 positions: crosses two epoch boundaries
    single = _take(_iterator(global_batch_size=12), steps)
    for n in (2, 3):
        shares = [
            _take(_iterator(global_batch_size=12, process_count=n, process_index=p), steps)
            for p in range(n)
        ]
        for t in range(steps):
            for key in ("image", "record_index"):
                joined = np.concatenate([share[t][key] for share in shares])
                np.testing.assert_array_equal(joined, single[t][key])


def test_flips_are_per_position_and_about_half():
    flipped = _take(_iterator(global_batch_size=40), 5)
    plain = _take(_iterator(global_batch_size=40, random_flip=False), 5)
    n_flipped = 0
    for a, b in zip(flipped, plain, strict=True):
        for x, y in zip(a["image"], b["image"], strict=True):
            same, mirrored = np.array_equal(x, y), np.array_equal(x, y[:, ::-1])
            assert same or mirrored
            n_flipped += mirrored and not same
    assert 70 <= n_flipped <= 130  # of 200 images


def test_seed_changes_the_order():
    a = next(_iterator(seed=1))
    b = next(_iterator(seed=2))
    assert not np.array_equal(a["record_index"], b["record_index"])


def test_restore_mid_epoch_continues_identically():
    reference = _take(_iterator(global_batch_size=12, shuffle="buffer"), 9)
    it = _iterator(global_batch_size=12, shuffle="buffer")
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    assert state["next_batch"] == 2
    resumed = _iterator(global_batch_size=12, shuffle="buffer")
    resumed.set_state(state)
    for want, got in zip(reference[2:], _take(resumed, 7), strict=True):
        np.testing.assert_array_equal(want["image"], got["image"])
    # A restored state may be re-applied to a running iterator too.
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], reference[2]["image"])


def test_state_from_another_stream_is_refused():
    state = _iterator(global_batch_size=12).get_state()
    with pytest.raises(DataError, match="global_batch_size: checkpoint 12, now 8"):
        _iterator(global_batch_size=8).set_state(state)
    with pytest.raises(DataError, match="not written by this pipeline"):
        _iterator().set_state({"next_index": 3})
    # Another process count is fine: the state names a global batch.
    _iterator(global_batch_size=12, process_count=2).set_state(state)


def test_orbax_checkpoint_round_trip(tmp_path):
    it = _iterator(global_batch_size=12)
    _take(it, 3)
    expected = _take(_iterator(global_batch_size=12), 6)[3:]
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    restored = _iterator(global_batch_size=12)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    for want, got in zip(expected, _take(restored, 3), strict=True):
        np.testing.assert_array_equal(want["image"], got["image"])
    saved = json.loads(next((tmp_path / "ckpt" / "3" / "data").glob("process_*.json")).read_text())
    assert saved["next_batch"] == 3


def test_gin_configures_the_iterator():
    gin.clear_config()
    try:
        gin.parse_config(
            ["make_train_iterator.dataset = 'digits'", "make_train_iterator.image_size = 12"]
        )
        it = make_train_iterator(global_batch_size=4, seed=0, process_index=0, process_count=1)
        assert next(it)["image"].shape == (4, 12, 12, 1)
        assert it.spec.num_records == 1797
    finally:
        gin.clear_config()


_ENTRY = """
import json, multiprocessing, os, signal, sys, time
import numpy as np
from jcdm.data import make_train_iterator

def main():
    state, out = json.loads(sys.argv[1]), sys.argv[2]
    it = make_train_iterator(dataset={data!r}, global_batch_size=12, seed=3, process_index=0,
                             process_count=1, worker_count=2, with_record_index=True)
    it.set_state(state)
    batches = [next(it)]
    # A Ctrl-C in a terminal reaches the workers too: they ignore it (the trainer decides).
    workers = multiprocessing.active_children()
    def ignoring(pid):  # SIGHUP (1) and SIGINT (2) in the ignored set, once the worker is up
        with open(f"/proc/{{pid}}/status") as f:
            mask = next(int(l.split()[1], 16) for l in f if l.startswith("SigIgn:"))
        return mask & 0b11 == 0b11
    t0 = time.time()
    while not all(ignoring(w.pid) for w in workers) and time.time() - t0 < 120:
        time.sleep(0.05)
    for w in workers:
        os.kill(w.pid, signal.SIGINT)
        os.kill(w.pid, signal.SIGHUP)
    time.sleep(1.0)
    alive = [w.is_alive() for w in workers]
    batches += [next(it) for _ in range(4)]
    print(json.dumps(alive))
    np.savez(out, image=np.stack([b["image"] for b in batches]),
             index=np.stack([b["record_index"] for b in batches]))
    print(json.dumps(it.get_state()))
    it.close()

if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
def test_worker_processes_under_python_m_give_the_same_stream(tmp_path):
    """Spawned workers inside a `python -m package` program; state moves across worker counts;
    the workers ignore SIGINT/SIGHUP (a terminal's Ctrl-C reaches the whole process group)."""
    package = tmp_path / "entrypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(textwrap.dedent(_ENTRY.format(data=DATA)))
    reference = _take(_iterator(global_batch_size=12), 9)
    it = _iterator(global_batch_size=12)
    _take(it, 2)  # resume mid-epoch from a 0-worker run's state
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "entrypkg", json.dumps(it.get_state()), str(tmp_path / "out.npz")],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(got["image"], np.stack([b["image"] for b in reference[2:7]]))
    np.testing.assert_array_equal(
        got["index"], np.stack([b["record_index"] for b in reference[2:7]])
    )
    alive, state = map(json.loads, proc.stdout.strip().splitlines()[-2:])
    assert alive == [True, True]  # both workers survived SIGINT and SIGHUP
    assert state["next_batch"] == 7
    back = _iterator(global_batch_size=12)
    back.set_state(state)  # and back to 0 workers
    np.testing.assert_array_equal(next(back)["image"], reference[7]["image"])

"""A run knows its data, and what it restores is what it saved: real trainer processes.

One module-scoped fixture (the smoke model on one process, on a converted dataset so that a
second one of the same size and shape exists):

    ref:       6 steps on dataset A, saves at 2, 4, 6 (the uninterrupted run)
    other:     resumes ref's workdir on dataset B (same size and shape): exit 2 before anything
               is written
    resumed:   a copy of ref's workdir with one byte of step 6's array data changed: falls back
               to step 4, trains steps 5 and 6, must end bitwise equal to ref
    inference: `--only_inference` on a workdir whose step 6 is damaged (falls back to step 4),
               with another model configuration (CheckpointMismatch, exit 2), and on a workdir
               that does not exist (exit 2, nothing created)

Between them, in this process, every file of ref's step 6 has one byte changed in turn and is
checked by `tools/inspect_checkpoint.py`'s verification.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest

from jcdm.data import write_image_records
from tests.trainer import run_trainer

pytestmark = pytest.mark.slow

STEPS = 6
TRAIN = [
    "--gin",
    "gin/smoke.gin",
    "--gin.EvalConfig.every=0",
    f"--gin.train.num_steps={STEPS}",
    "--gin.train.curriculum_steps=8",  # the suite's one-device smoke step: a compile-cache hit
    "--gin.CheckpointConfig.save_every=2",
]


def _dataset(out, seed: int) -> str:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    write_image_records(
        out,
        [(images, np.zeros(64, np.int32))],
        num_records=64,
        image_shape=(16, 16, 3),
        num_shards=2,
        split="train",
        name=f"set{seed}",
    )
    return str(out)


def _snapshot(workdir: str) -> dict[str, bytes]:
    """Every file of a workdir but the compile cache, by relative path."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, workdir)] = open(path, "rb").read()
    return out


def _flip(path: str, offset: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


def _largest_array_file(step_dir: str) -> str:
    files = [
        os.path.join(root, f)
        for root, _, names in os.walk(os.path.join(step_dir, "state"))
        for f in names
        if os.path.basename(root) == "d"
    ]
    return max(files, key=os.path.getsize)


@dataclasses.dataclass
class Runs:
    root: str
    ref_dir: str
    ref: object
    ref_info: dict
    other: object
    other_before: dict
    other_after: dict
    resumed_dir: str
    resumed: object
    inference_dir: str
    inference: object
    mismatch: object
    missing: object
    missing_dir: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    from tools.inspect_checkpoint import describe

    root = str(tmp_path_factory.mktemp("integrity"))
    data_a = _dataset(os.path.join(root, "a"), seed=1)
    data_b = _dataset(os.path.join(root, "b"), seed=2)
    ref_dir = os.path.join(root, "ref")
    ref = run_trainer([*TRAIN, f"--gin.DATA_DIR='{data_a}'", "--workdir", ref_dir])
    assert ref.returncode == 0, ref.stderr[-4000:]
    ref_info = describe(ref_dir)

    other_dir = os.path.join(root, "other")
    shutil.copytree(ref_dir, other_dir)
    before = _snapshot(other_dir)
    other = run_trainer(
        [*TRAIN, f"--gin.DATA_DIR='{data_b}'", "--gin.train.num_steps=8", "--workdir", other_dir]
    )
    after = _snapshot(other_dir)

    resumed_dir = os.path.join(root, "resumed")
    shutil.copytree(ref_dir, resumed_dir)
    target = _largest_array_file(os.path.join(resumed_dir, "checkpoints", str(STEPS)))
    _flip(target, os.path.getsize(target) // 2)
    resumed = run_trainer([*TRAIN, f"--gin.DATA_DIR='{data_a}'", "--workdir", resumed_dir])

    inference_dir = os.path.join(root, "inference")
    shutil.copytree(ref_dir, inference_dir)
    target = _largest_array_file(os.path.join(inference_dir, "checkpoints", str(STEPS)))
    _flip(target, os.path.getsize(target) // 2)
    infer = [
        "--gin",
        "gin/smoke.gin",
        f"--gin.DATA_DIR='{data_a}'",
        "--only_inference",
        "--gin.inference.num_samples=4",
        "--gin.inference.sampler_steps=(1,)",
    ]
    inference = run_trainer([*infer, "--workdir", inference_dir])
    mismatch = run_trainer([*infer, "--gin.NCSNpp.nf=8", "--workdir", ref_dir])
    missing_dir = os.path.join(root, "no", "such", "run")
    missing = run_trainer([*infer, "--workdir", missing_dir])
    return Runs(
        root, ref_dir, ref, ref_info, other, before, after, resumed_dir, resumed,
        inference_dir, inference, mismatch, missing, missing_dir,
    )  # fmt: skip


def test_resuming_on_another_dataset_exits_2_naming_both_and_writes_nothing(runs):
    err = runs.other.stderr
    assert runs.other.returncode == 2, err[-4000:]
    assert "another dataset than the checkpoint was trained on" in err
    assert os.path.join(runs.root, "a") in err and os.path.join(runs.root, "b") in err
    assert "fresh workdir" in err
    # config.gin, metrics and checkpoints are byte-identical: nothing was rewritten.
    changed = [k for k in runs.other_before if runs.other_after.get(k) != runs.other_before[k]]
    added = sorted(set(runs.other_after) - set(runs.other_before))
    assert not changed and not [a for a in added if not a.startswith("compile_cache")], (
        changed,
        added,
    )


def test_a_flipped_byte_never_reaches_training_and_the_resumed_run_equals_the_reference(runs):
    from tools.inspect_checkpoint import describe

    err = runs.resumed.stderr
    assert runs.resumed.returncode == 0, err[-4000:]
    assert re.search(rf"checkpoint at step {STEPS} in .* is (damaged|unreadable)", err), err[-4000:]
    assert f"resumed from step {STEPS - 2}" in err
    assert os.listdir(os.path.join(runs.resumed_dir, "checkpoints_unreadable"))[0].startswith(
        f"{STEPS}-"
    )
    info = describe(runs.resumed_dir)
    assert info["step"] == STEPS and info["verified"] is True
    assert info["params_sha256"] == runs.ref_info["params_sha256"]
    assert info["ema_params_sha256"] == runs.ref_info["ema_params_sha256"]


def test_every_one_byte_change_in_a_smoke_checkpoint_is_caught_or_harmless(runs, tmp_path):
    """Over every file of the trainer's newest checkpoint: the tool's verification either
    refuses the step or reads parameters and EMA bitwise equal to those saved."""
    from etils import epath

    from tools.inspect_checkpoint import check, params_digest

    assert runs.ref_info["verified"] is True and runs.ref_info["damaged"] == {}
    work = tmp_path / "w"
    shutil.copytree(os.path.join(runs.ref_dir, "checkpoints", str(STEPS)), work)
    files = sorted(
        os.path.relpath(os.path.join(r, f), work) for r, _, fs in os.walk(work) for f in fs
    )
    caught = []
    for rel in files:
        path = os.path.join(work, rel)
        offset = os.path.getsize(path) // 2
        _flip(path, offset)
        try:
            state, verified = check(epath.Path(work))
        except ValueError:
            caught.append(rel)
        else:
            assert verified, rel
            assert params_digest(state["params"])[1] == runs.ref_info["params_sha256"], rel
            assert params_digest(state["ema_params"])[1] == runs.ref_info["ema_params_sha256"]
        _flip(path, offset)  # back to the original byte
    print(f"{len(caught)} of {len(files)} flips caught: {caught}")
    assert any(f.startswith("state/ocdbt.process_0/d/") for f in caught)
    assert {"hashes/metadata", "data/metadata", "meta/metadata"} <= set(caught)


def test_only_inference_verifies_and_falls_back_like_training(runs):
    err = runs.inference.stderr
    assert runs.inference.returncode == 0, err[-4000:]
    assert re.search(rf"checkpoint at step {STEPS} in .* is (damaged|unreadable)", err), err[-4000:]
    results = json.load(
        open(os.path.join(runs.inference_dir, "inference", "step_4", "results.json"))
    )
    assert results["step"] == STEPS - 2
    assert "Event loop is closed" not in err


def test_only_inference_with_another_model_is_the_training_mismatch_message(runs):
    err = runs.mismatch.stderr
    assert runs.mismatch.returncode == 2, err[-4000:]
    assert "CheckpointMismatch" in err and "written by another configuration" in err
    assert "<workdir>/config.gin" in err


def test_only_inference_on_a_missing_workdir_exits_2_and_creates_nothing(runs):
    err = runs.missing.stderr
    assert runs.missing.returncode == 2, err[-4000:]
    assert "does not exist" in err and runs.missing_dir in err
    assert not os.path.exists(os.path.join(runs.root, "no"))

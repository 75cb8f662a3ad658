"""Does the trainer still learn? The demo's joint model, trained for STEPS steps, must reach a
digits Frechet distance below THRESHOLD with >= 8 of 10 classes; the same run trained on
Gaussian noise instead of the digits (a break that certainly ruins learning) must miss it.
The threshold comes from the study (bench/results/study_digits.json, docs/results.md "The
quality test's threshold"): the worst joint seed at step STEPS times MARGIN.

The twin differs from the trained run only in its data, so every program of it (init, train
step, sampler, the digits classifier) is the trained run's: it starts once the trained run has
written its train step to the compile cache and compiles no train step (asserted), and the
trained run then loads the samplers the twin compiled: one default-level train-step compile
(40-60 s) fewer than with the earlier twin, a learning rate of 1e-12 (a constant of the train
step, so a program of its own). Alone on an idle 2-core machine with an empty cache: 1m21s,
133 CPU-s (2026-12-07; 232-290 CPU-s on the slower box before, tests/README.md). The twin runs
TWIN_STEPS steps: from the initialisation, with EMA 0.99, its samples stay the untrained
model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from jcdm.data import write_image_records
from tests.trainer import REPO, read_metrics

STEPS = 240  # the study's evaluation point with the curriculum of its 400-step runs
TWIN_STEPS = 10
# The study at step 240: joint, 1-step, 500 samples; the worst seed (docs/results.md)
WORST_SEED_FD = 292.7  # seed 2 (seeds 0, 1: 245.4, 245.5)
MARGIN = 1.5
THRESHOLD = WORST_SEED_FD * MARGIN


def _trainer(workdir: str, extra: list[str], env: dict, log) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "jcdm",
        "--gin",
        "gin/demo.gin",
        "--workdir",
        workdir,
        "--gin.train.curriculum_steps=400",
        "--gin.EvalConfig.every=0",
        "--gin.CheckpointConfig.save_every=100000",
        "--gin.FIDConfig.num_samples=500",
        "--gin.train.log_every=1000",
        "--gin.WandbConfig.mode='disabled'",  # demo.gin logs offline: a W&B service per run
        *extra,
    ]
    return subprocess.Popen(
        args,
        cwd=REPO,
        # XLA's default optimisation, not the suite's fast-compile level (conftest): the demo's
        # 240 steps run 2x faster (155-164 vs 74-76 img/s measured), more than the slower
        # compile costs.
        env={**os.environ, "XLA_FLAGS": "", "JAX_EXPLAIN_CACHE_MISSES": "true", **env},
        stdout=log,  # a file, not a pipe: the two run at once and neither may block on output
        stderr=subprocess.STDOUT,
    )


def _noise_dataset(out) -> str:
    """As many Gaussian-noise images as there are digits, in the digits' shape: nothing to learn."""
    n = 1797
    rng = np.random.default_rng(0)
    images = np.clip(rng.normal(128.0, 64.0, (n, 16, 16, 1)), 0, 255).astype(np.uint8)
    write_image_records(
        out,
        [(images, np.zeros(n, np.int32))],
        num_records=n,
        image_shape=(16, 16, 1),
        num_shards=1,
        split="train",
        name="noise",
    )
    return str(out)


def _final_quality(workdir: str) -> dict:
    rows = [r for r in read_metrics(workdir) if "digits_fd_1step" in r]
    assert rows, f"no digits metric in {workdir}/metrics.jsonl"
    return rows[-1]


@pytest.mark.slow
def test_trained_demo_beats_the_threshold_and_a_run_on_noise_misses_it(tmp_path):
    from jcdm.fid import digits

    weights = tmp_path / "digits_cnn.npz"
    params, acc = digits.train_classifier()  # the cached classifier, made here from scratch
    digits.save_params(params, weights, acc)
    env = {"JCDM_DIGITS_WEIGHTS": str(weights)}
    noise = _noise_dataset(tmp_path / "noise_data")
    names = ("trained", "noise")
    logs = [open(tmp_path / f"{name}.log", "w") for name in names]
    trained = _trainer(
        str(tmp_path / "trained"),
        [f"--gin.train.num_steps={STEPS}", f"--gin.FIDConfig.every={STEPS}"],
        env,
        logs[0],
    )
    deadline = time.monotonic() + 900
    while "train step compiled" not in (tmp_path / "trained.log").read_text():
        if trained.poll() is not None or time.monotonic() > deadline:
            trained.kill()
            log = (tmp_path / "trained.log").read_text()
            pytest.fail(f"trained: no compiled train step:\n{log[-3000:]}")
        time.sleep(0.5)
    broken = _trainer(
        str(tmp_path / "noise"),
        [
            f"--gin.train.num_steps={TWIN_STEPS}",
            f"--gin.FIDConfig.every={TWIN_STEPS}",
            f"--gin.DATA_DIR='{noise}'",
        ],
        env,
        logs[1],
    )
    for p in (trained, broken):
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    for f in logs:
        f.close()
    outs = [(tmp_path / f"{name}.log").read_text() for name in names]
    assert trained.returncode == 0, outs[0][-3000:]
    assert broken.returncode == 0, outs[1][-3000:]
    assert "final sample quality: digits_fd_1step=" in outs[0]  # the run prints its metric
    # The twin's train step came from the trained run's compile (or an earlier session's):
    # one program, two runs.
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit_train_step'" not in outs[1], outs[1][-3000:]
    good, bad = _final_quality(str(tmp_path / "trained")), _final_quality(str(tmp_path / "noise"))
    print(json.dumps({"trained": good, "noise": bad}))

    assert good["digits_fd_1step"] < THRESHOLD, good
    assert good["digits_classes_1step"] >= 8, good
    assert bad["digits_fd_1step"] > THRESHOLD, bad

    # The metric's ordering: held-out real digits < trained samples < the twin (untrained) and
    # Gaussian noise. The untrained model's 1-step samples are near-constant grey images (one
    # class): this metric ranks them above noise (measured 1,900 vs 838), so untrained < noise,
    # the order the issue expected, does not hold and is not asserted (docs/results.md).
    ev = digits.DigitsEvaluator(weights)
    real = ev(ev.heldout_images)["fd"]
    noise = ev(np.random.default_rng(0).normal(size=(500, 16, 16, 1)))["fd"]
    assert real < good["digits_fd_1step"] < min(bad["digits_fd_1step"], noise)
    assert noise > THRESHOLD and bad["digits_classes_1step"] <= 2
    # Learning, not copying: samples are no closer to a training image than real digits are
    # to the train split (copies would sit at 0).
    assert good["digits_nn_rms_1step"] > 0.5 * ev.real_nn_rms

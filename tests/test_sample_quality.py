"""Does the trainer still learn? The demo's joint model, trained for STEPS steps, must reach a
digits Frechet distance below THRESHOLD with >= 8 of 10 classes; the same run with a learning
rate of 1e-12 (a broken update: 0 itself is refused by the validation layer) must miss it.
The threshold comes from the study (bench/results/study_digits.json, docs/results.md "The
quality test's threshold"): the worst joint seed at step STEPS times MARGIN.

The two trainers run at the same time: each compiles its own train step (the learning rate is
baked into the program) and XLA compiles on one thread, so two cores overlap the compiles. The
twin runs TWIN_STEPS steps only: RAdam's steps are at most ~lr in size, so with lr 1e-12 a
parameter moves by less than float32 resolves at its magnitude: the parameters and their EMA
stay (all but exactly) at the initialisation whatever the step count, and its samples are the
same. With so few steps it keeps the suite's fast-compile XLA level (conftest): 63 vs 96 CPU
seconds, the same metric to the last digit (measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.trainer import REPO, read_metrics

STEPS = 240  # the study's evaluation point with the curriculum of its 400-step runs
TWIN_STEPS = 10
# The study at step 240: joint, 1-step, 500 samples; the worst seed (docs/results.md)
WORST_SEED_FD = 292.7  # seed 2 (seeds 0, 1: 245.4, 245.5)
MARGIN = 1.5
THRESHOLD = WORST_SEED_FD * MARGIN


def _trainer(
    workdir: str, extra: list[str], env: dict, log, *, fast_compile: bool = False
) -> subprocess.Popen:
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
        # The trained run at XLA's default optimisation, not the suite's fast-compile level
        # (conftest): its 240 steps run 2x faster (155-164 vs 74-76 img/s measured), more than
        # the slower compile costs. The twin's few steps keep the fast-compile level.
        env={**os.environ, **({} if fast_compile else {"XLA_FLAGS": ""}), **env},
        stdout=log,  # a file, not a pipe: the two run at once and neither may block on output
        stderr=subprocess.STDOUT,
    )


def _final_quality(workdir: str) -> dict:
    rows = [r for r in read_metrics(workdir) if "digits_fd_1step" in r]
    assert rows, f"no digits metric in {workdir}/metrics.jsonl"
    return rows[-1]


@pytest.mark.slow
def test_trained_demo_beats_the_threshold_and_lr0_misses_it(tmp_path):
    from jcdm.fid import digits

    weights = tmp_path / "digits_cnn.npz"
    params, acc = digits.train_classifier()  # the cached classifier, made here from scratch
    digits.save_params(params, weights, acc)
    env = {"JCDM_DIGITS_WEIGHTS": str(weights)}
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("trained", "lr0")]
    trained = _trainer(
        str(tmp_path / "trained"),
        [f"--gin.train.num_steps={STEPS}", f"--gin.FIDConfig.every={STEPS}"],
        env,
        logs[0],
    )
    broken = _trainer(
        str(tmp_path / "lr0"),
        [
            f"--gin.train.num_steps={TWIN_STEPS}",
            f"--gin.FIDConfig.every={TWIN_STEPS}",
            "--gin.make_optimizer.learning_rate=1e-12",
        ],
        env,
        logs[1],
        fast_compile=True,
    )
    for p in (trained, broken):
        p.wait(timeout=900)
    for f in logs:
        f.close()
    outs = [(tmp_path / f"{name}.log").read_text() for name in ("trained", "lr0")]
    assert trained.returncode == 0, outs[0][-3000:]
    assert broken.returncode == 0, outs[1][-3000:]
    assert "final sample quality: digits_fd_1step=" in outs[0]  # the run prints its metric
    good, bad = _final_quality(str(tmp_path / "trained")), _final_quality(str(tmp_path / "lr0"))
    print(json.dumps({"trained": good, "lr0": bad}))

    assert good["digits_fd_1step"] < THRESHOLD, good
    assert good["digits_classes_1step"] >= 8, good
    assert bad["digits_fd_1step"] > THRESHOLD, bad

    # The metric's ordering: held-out real digits < trained samples < untrained samples and
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

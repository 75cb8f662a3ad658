"""Compute precision and steps per call: each setting trains, and float32 results do
not depend on how many steps one compiled call runs."""

import numpy as np
import pytest

from tests.trainer import QUIET, read_metrics, run_trainer

pytestmark = pytest.mark.slow  # every test here starts a trainer process

# Fixed N (s1 = s0) and a high learning rate, as test_train.test_loss_falls.
FALLS = ["--gin.ICTConfig.s1=10", "--gin.make_optimizer.learning_rate=2e-3"]


def test_bfloat16_trains(tmp_path):
    """bfloat16 compute: 50 steps at fixed N (s1 = s0, so the loss scale does not move with the
    curriculum); float32 learning is tests/test_sample_quality.py's (the demo's samples).
    Per-step losses are noisy (one batch of 16, random sigmas: std ~3 around ~16), so compare
    means of the first and last 10 rows. Steps per call are checked in float32 below: the scan
    does not depend on the compute dtype, so the two settings are not combined (a scanned step
    costs a long compile at XLA's default level and runs ~13x slower at the suite's level 0)."""
    num_steps = 50
    args = ["--gin", "gin/smoke.gin", "--workdir", str(tmp_path), *QUIET, *FALLS]
    args += [f"--gin.train.num_steps={num_steps}", "--gin.COMPUTE_DTYPE='bfloat16'"]
    r = run_trainer(args)
    assert r.returncode == 0, r.stderr
    assert "COMPUTE_DTYPE = 'bfloat16'" in (tmp_path / "config.gin").read_text()
    rows = read_metrics(str(tmp_path))
    assert [row["step"] for row in rows] == list(range(1, num_steps + 1))
    # The consistency loss, the score head's loss and their sum all fall (the head learns too).
    for key, factor in (("loss", 0.95), ("loss_ct", 0.98), ("loss_dsm", 0.85)):
        v = np.array([row[key] for row in rows])
        assert np.isfinite(v).all(), key
        assert v[-10:].mean() < factor * v[:10].mean(), (key, v)


def test_float32_results_do_not_depend_on_steps_per_call(tmp_path):
    """4 steps as 4 calls and as 2 calls of a 2-step scan: same metrics at steps 2 and 4 (the
    same batches, keys and updates; only XLA's fusion across steps may round differently).
    The scan is unrolled (train.unroll_steps): at the suite's XLA level 0 a rolled scan's loop
    runs ~13x slower, 49 vs 37 CPU seconds for this run (measured); the two differ only in the
    scan's unroll argument, and tests/test_update.py checks both in-process.
    curriculum_steps=8: the one-step program is the suite's shared smoke step
    (tests/test_train.py), served by the compile cache."""
    rows = {}
    for spc, unroll in ((1, False), (2, True)):
        workdir = tmp_path / f"spc{spc}_{unroll}"
        args = ["--gin", "gin/smoke.gin", "--workdir", str(workdir), *QUIET]
        args += ["--gin.train.num_steps=4", "--gin.train.curriculum_steps=8"]
        args += ["--gin.train.log_every=2"]
        args += [f"--gin.train.steps_per_call={spc}", f"--gin.train.unroll_steps={unroll}"]
        r = run_trainer(args)
        assert r.returncode == 0, r.stderr
        rows[spc, unroll] = read_metrics(str(workdir))
    want, got = rows[1, False], rows[2, True]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4]
    for a, b in zip(want, got, strict=True):
        for key in ("loss", "loss_ct", "loss_dsm", "grad_norm", "sigma_mean", "num_scales"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)

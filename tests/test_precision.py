"""Compute precision and steps per call: each setting trains, and float32 results do
not depend on how many steps one compiled call runs."""

import numpy as np
import pytest

from tests.trainer import QUIET, read_metrics, run_trainer

pytestmark = pytest.mark.slow  # every test here starts a trainer process

# Fixed N (s1 = s0) and a high learning rate, as test_train.test_loss_falls.
FALLS = ["--gin.ICTConfig.s1=10", "--gin.make_optimizer.learning_rate=2e-3"]


def test_bfloat16_with_a_4_step_scan_trains(tmp_path):
    """Both settings in one run (bfloat16 compute, 4 updates per compiled call); float32 with one
    step per call is test_train.test_loss_falls. Per-step losses are noisy (one batch of 16,
    random sigmas: std ~3 around ~16), so compare means of the first and last 10 logged rows."""
    spc, num_steps = 4, 100
    args = ["--gin", "gin/smoke.gin", "--workdir", str(tmp_path), *QUIET, *FALLS]
    args += [f"--gin.train.num_steps={num_steps}", f"--gin.train.log_every={spc}"]
    args += ["--gin.COMPUTE_DTYPE='bfloat16'", f"--gin.train.steps_per_call={spc}"]
    # The suite's fast-compile XLA flags (conftest) make a scanned step ~13x slower on XLA:CPU
    # (4.4 s instead of 0.33 s per step), so this run uses XLA's default optimisation.
    r = run_trainer(args, env={"XLA_FLAGS": ""})
    assert r.returncode == 0, r.stderr
    config = (tmp_path / "config.gin").read_text()
    assert "COMPUTE_DTYPE = 'bfloat16'" in config and "train.steps_per_call = 4" in config
    rows = read_metrics(str(tmp_path))
    assert [row["step"] for row in rows] == list(range(spc, num_steps + 1, spc))
    loss = np.array([row["loss"] for row in rows])
    assert np.isfinite(loss).all()
    assert loss[-10:].mean() < 0.95 * loss[:10].mean(), loss


def test_float32_results_do_not_depend_on_steps_per_call(tmp_path):
    """8 steps as 8 calls, as 2 calls of a 4-step scan, and as 4 calls of a 2-step scan unrolled
    (train.unroll_steps; 2 steps keep its compile short): same metrics at steps 4 and 8 (the same
    batches, keys and updates; only XLA's fusion across steps may round differently)."""
    rows = {}
    for spc, unroll in ((1, False), (4, False), (2, True)):
        workdir = tmp_path / f"spc{spc}_{unroll}"
        args = ["--gin", "gin/smoke.gin", "--workdir", str(workdir), *QUIET]
        args += ["--gin.train.num_steps=8", "--gin.train.log_every=4"]
        args += [f"--gin.train.steps_per_call={spc}", f"--gin.train.unroll_steps={unroll}"]
        r = run_trainer(args)
        assert r.returncode == 0, r.stderr
        rows[spc, unroll] = read_metrics(str(workdir))
    want = rows[1, False]
    for got in (rows[4, False], rows[2, True]):
        assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8]
        for a, b in zip(want, got, strict=True):
            for key in ("loss", "loss_ct", "loss_dsm", "grad_norm", "sigma_mean", "num_scales"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)

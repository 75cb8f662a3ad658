"""bench/ stays runnable: the FLOP count it divides by, and bench/step.py end to end."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jcdm import benchmark
from tests.trainer import REPO


def test_model_flops_counts_a_matmul_and_one_scan_step():
    a = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    b = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    assert benchmark.model_flops(lambda a, b: a @ b, a, b) == 2 * 64 * 32 * 16

    def scanned(c, xs):  # 4 steps of c @ x: the analysis counts the loop body once
        return jax.lax.scan(lambda c, x: (c @ x, None), c, xs)[0]

    c = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    xs = jax.ShapeDtypeStruct((4, 8, 8), jnp.float32)
    # One 8x8 matmul (1,024) plus the loop counter's add and compare, not four matmuls.
    assert 2 * 8**3 <= benchmark.model_flops(scanned, c, xs) < 2 * 8**3 + 16


@pytest.mark.slow
def test_bench_step_writes_its_table(tmp_path):
    out = tmp_path / "step.json"
    cmd = [sys.executable, "bench/step.py", "--configs", "test", "--heads", "none"]
    cmd += ["--calls", "1", "--rounds", "1", "--matmul_n", "256", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["steps"]
    assert row["name"] == "test/ict/float32/spc1" and row["global_batch_size"] == 16
    # The smoke ict step: 1.9 GFLOP by XLA's count (4 passes of the 16x16 backbone, batch 16).
    assert 1.5e9 < row["flops_per_step"] < 2.5e9
    assert row["step_s"] > 0 and row["utilisation"] > 0 and row["step_vs_ict"] == 1.0
    assert result["matmul"]["n"] == 256 and "test/ict/float32/spc1" in r.stdout

"""bench/ stays runnable: the FLOP count it divides by, and bench/step.py end to end."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jcdm.dev import benchmark, profiling
from tests.trainer import REPO


def test_model_flops_counts_matmuls_convolutions_and_every_scan_step():
    a = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    b = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    assert benchmark.model_flops(lambda a, b: a @ b, a, b) == 2 * 64 * 32 * 16

    def scanned(c, xs):  # 4 steps of c @ x, each counted
        return jax.lax.scan(lambda c, x: (c @ x, None), c, xs)[0]

    c = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    xs = jax.ShapeDtypeStruct((4, 8, 8), jnp.float32)
    assert benchmark.model_flops(scanned, c, xs) == 4 * 2 * 8**3

    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

    fwd = 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)  # padded taps count: the dense work a GEMM does
    assert benchmark.model_flops(conv, x, w) == fwd
    # The gradient with respect to both operands adds two convolutions of the same size
    # (stride 1; a strided conv's input gradient is lhs-dilated and counts its zeros).
    grad = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
    assert benchmark.model_flops(grad, x, w) == 3 * fwd


@pytest.mark.slow
def test_bench_step_writes_its_table(tmp_path):
    out = tmp_path / "step.json"
    cmd = [sys.executable, "bench/step.py", "--configs", "test", "--heads", "none"]
    cmd += ["--calls", "1", "--rounds", "1", "--matmul_n", "256", "--out", str(out)]
    cmd += ["--variant", "sep", "FIR_IMPL='separable'", "--profile", "1"]
    cmd += ["--profile_dir", str(tmp_path / "prof")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["steps"]
    assert row["name"] == "test/ict/float32/spc1/sep" and row["global_batch_size"] == 16
    assert row["bindings"] == ["FIR_IMPL='separable'"]
    # The smoke ict step: 1.87 GFLOP of convolutions and matmuls (4 passes of the 16x16
    # backbone at batch 16: student forward and backward, teacher forward).
    assert 1.8e9 < row["flops_per_step"] < 1.95e9
    assert row["step_s"] > 0 and row["utilisation"] > 0 and row["step_vs_ict"] == 1.0
    assert result["matmul_n"] == 256 and "test/ict/float32/spc1/sep" in r.stdout
    # No datasheet peak for a CPU: MFU falls back to the matmul reference and says so.
    assert row["mfu_basis"].startswith("matmul") and row["mfu"] == pytest.approx(row["utilisation"])
    assert row["entry_ops"]["total"] > 100 and row["entry_ops"]["conv"] > 0
    assert "no cost projection at float32" in r.stdout  # no cifar rows in this run
    # The profile: per-category times add up to the traced op time, convolutions and matmuls
    # are found, and the top ops name their HLO instructions.
    prof = row["profile"]
    assert "error" not in prof, prof
    assert prof["source"] == "host thunks" and 0 < prof["busy_fraction"] <= 1.0
    cats = prof["category_ms_per_call"]
    assert sum(cats.values()) == pytest.approx(prof["op_ms_per_call"], rel=1e-6)
    assert cats.get("matmul", 0) + cats.get("conv", 0) > 0
    assert all(o["hlo"] for o in prof["top_ops"][:5])
    assert "profile (host thunks, 1 calls)" in r.stdout


def test_profiling_categories_from_hlo_and_kernel_names():
    hlo = """HloModule m

%fused_computation.1 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %e = f32[4]{0} exponential(%p)
}

ENTRY %main (a: f32[2,8,8,4], w: f32[3,3,1,4]) -> f32[2,8,8,4] {
  %a = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %convolution.3 = f32[2,8,8,4]{3,2,1,0} convolution(%a, %w), feature_group_count=4
  %convolution.4 = f32[2,8,8,4]{3,2,1,0} convolution(%a, %v), feature_group_count=1
  %fusion.1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  ROOT %dot.2 = f32[2,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}
}
"""
    instrs = profiling.hlo_instructions(hlo)
    bodies = profiling._called_computations(hlo)
    cat = {name: profiling.categorize(instrs[name], bodies) for name in instrs}
    assert cat["convolution.3"] == "conv_grouped" and cat["convolution.4"] == "conv"
    assert cat["fusion.1"] == "fusion_loop" and cat["dot.2"] == "matmul"
    # The opcode decides, not metadata or operand names.
    tricky = {
        'f32[4]{0} reduce(%a, %c), dimensions={0}, metadata={op_name="transpose(jvp(f))"}': "other",
        "f32[16]{0} fusion(f32[16] %all-reduce.3, %b), kind=kLoop, calls=%fused_computation.1": (
            "fusion_loop"
        ),
        "f32[8]{0} add(%cublas-gemm.2, %b)": "other",
        "(f32[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%a, %w), window={size=3x3},"
        ' feature_group_count=4, custom_call_target="__cudnn$convForward"': "conv_grouped",
        "f32[64]{0} all-reduce(%g), replica_groups={}, to_apply=%add": "collective",
    }
    assert {k: profiling.categorize(k, bodies) for k in tricky} == tricky
    kernels = {
        "sm90_xmma_wgrad_indexed_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc": "conv",
        "void cudnn::cnn::conv2d_grouped_direct_kernel<false, true>": "conv_grouped",
        "sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32": "matmul",
        "input_add_reduce_fusion_5": "fusion_reduce",
        "loop_convert_fusion_2": "fusion_loop",
        "void tensorTransformGeneric<float, float, float, true>": "copy_transpose",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "collective",
        "all_reduce_one_shot_kernel": "collective",
        "sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc_g8_tilesize64": (
            "conv_grouped"
        ),
        "void wgrad_alg0_engine_NHWC<float, 128, 5, 5, 3, 3, 3, false>": "conv",
        "sm80_xmma_fprop_implicit_gemm_indexed_tf32f32_nhwc_g1_tensor16x8x8_execute": "conv",
        "loop_reduce_precision_fusion": "fusion_loop",
        "triton_softmax_fusion": "fusion_reduce",
    }
    assert {k: profiling.categorize_kernel(k) for k in kernels} == kernels

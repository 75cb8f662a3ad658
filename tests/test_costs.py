"""Utilisation against the datasheet and the full run's cost (jcdm.dev.costs, bench/cost.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jcdm.dev import costs, profiling
from tests.trainer import REPO


def test_datasheet_peak_by_device_kind_prefix():
    assert costs.datasheet_peak("NVIDIA H200", "bfloat16") == 989.4e12
    assert costs.datasheet_peak("NVIDIA H100 80GB HBM3", "float32") == 494.7e12  # TF32
    assert costs.datasheet_peak("TPU v4", "bfloat16") == 275e12
    assert costs.datasheet_peak("TPU v5 lite", "bfloat16") == 197e12
    assert costs.datasheet_peak("cpu", "float32") is None


def test_projection_is_flops_over_chips_peak_and_utilisation():
    # The anchors' full iCT run: 170.2 GFLOP per image, 409.6M images, one H200 at 35.7%: 54.8 h.
    p = costs.project(
        method="ict", flops_per_image=170.2e9, utilisation=0.357, slice_name="8x H200"
    )
    assert p.chips == 8
    assert p.device_hours == pytest.approx(54.8, abs=0.1)
    assert p.hours == pytest.approx(p.device_hours / 8)
    v4 = costs.project(
        method="ict", flops_per_image=170.2e9, utilisation=0.5, slice_name="TPU v4-8"
    )
    assert v4.hours == pytest.approx(400_000 * 1024 * 170.2e9 / (4 * 275e12 * 0.5) / 3600)
    with pytest.raises(ValueError, match="utilisation"):
        costs.project(method="ict", flops_per_image=1.0, utilisation=0.0, slice_name="TPU v4-8")


def _row(head, pdb, step_s, flops=1e12, dtype="bfloat16"):
    return {
        "config": "cifar",
        "head": head,
        "dtype": dtype,
        "name": f"cifar/b{pdb}/{head}",
        "global_batch_size": pdb,
        "devices": 1,
        "flops_per_step": flops * pdb,
        "flops_per_sec": flops * pdb / step_s,
    }


def test_projection_takes_each_method_s_best_row():
    rows = [
        _row("ict", 128, 0.2),
        _row("ict", 256, 0.3),  # better: 2x the work in 1.5x the time
        _row("joint", 128, 0.25, flops=1.33e12),
        _row("ict", 512, 0.1, dtype="float32"),  # another dtype: ignored
        {**_row("ict", 8, 1e-3), "config": "test"},  # not the CIFAR config: ignored
    ]
    flops, util, chosen = costs.from_step_rows(rows, "NVIDIA H200")
    assert chosen == {"ict": "cifar/b256/ict", "joint": "cifar/b128/joint"}
    assert flops == {"ict": 1e12, "joint": 1.33e12}
    assert util["ict"] == pytest.approx(256e12 / 0.3 / 989.4e12)
    with pytest.raises(ValueError, match="add it to jcdm.dev.costs.PEAKS"):
        costs.from_step_rows(rows, "cpu")
    table = costs.cost_table(flops, util)
    assert [(r.method, r.slice) for r in table][:3] == [
        ("ict", "TPU v4-8"),
        ("ict", "TPU v5p-8"),
        ("ict", "8x H200"),
    ]


@pytest.mark.slow
def test_bench_cost_projects_the_h200_measurement():
    r = subprocess.run(
        [sys.executable, "bench/cost.py", "bench/results/step_h200_bf16_separable.json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    # 35.7% and 34.7% of the H200's bf16 peak; the joint run 75.0 H200-hours (the issue's ~75)
    assert "35.7% of peak" in r.stdout and "34.7% of peak" in r.stdout
    joint_h200 = [x for x in r.stdout.splitlines() if x.split()[:3] == ["joint", "8x", "H200"]]
    assert joint_h200 and joint_h200[0].split()[-1] == "75.0"


def test_entry_op_counts_leave_out_instructions_that_do_no_work():
    hlo = """HloModule m

%fused_computation.1 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %e = f32[4]{0} exponential(%p)
}

ENTRY %main (a: f32[2,8,8,4], w: f32[3,3,1,4]) -> (f32[4], f32[2,2]) {
  %a = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %c = f32[] constant(0)
  %convolution.3 = f32[2,8,8,4]{3,2,1,0} convolution(%a, %w), feature_group_count=4
  %fusion.1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  %fusion.2 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  %dot.2 = f32[2,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}
  %b = f32[2,2]{1,0} bitcast(%dot.2)
  ROOT %t = (f32[4]{0}, f32[2,2]{1,0}) tuple(%fusion.1, %b)
}
"""
    assert profiling.entry_op_counts(hlo) == {
        "total": 4,
        "conv_grouped": 1,
        "fusion_loop": 2,
        "matmul": 1,
    }


@pytest.mark.slow
def test_device_script_rows_all_parse(tmp_path):
    # The one prepared GPU call: every timed row's gin must parse before a device is spent on it.
    r = subprocess.run(
        ["bash", "bench/device_run.sh"],
        cwd=REPO,
        env={**os.environ, "DRY": "1", "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parsed = [x for x in r.stdout.splitlines() if x.endswith("bindings parse")]
    # 3 batches x (ict, joint), 2 optimizers, 3 attention impls, 1 profile
    assert len(parsed) == 12, r.stdout
    assert "cifar/b512/joint/bfloat16/spc1: bindings parse" in parsed[5]

"""The trainer end to end on the smoke config, as a user runs it (`python -m jcdm`)."""

import os

import numpy as np
import pytest
from PIL import Image

from jcdm import exit_codes
from tests.trainer import QUIET, read_metrics, run_trainer

pytestmark = pytest.mark.slow  # every test here starts a trainer process


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    # curriculum_steps=8: the compiled train step of the other one-device smoke runs
    # (test_exit_codes, test_precision, test_multihost's 1x1), so the compile cache serves it.
    args = ["--gin", "gin/smoke.gin", "--workdir", workdir, "--gin_bindings", "train.num_steps=4"]
    r = run_trainer([*args, "--gin.train.curriculum_steps=8"])
    assert r.returncode == 0, r.stdout + r.stderr
    return workdir, r


def test_outputs_of_a_run(smoke_run):
    workdir, r = smoke_run
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for key in ("loss", "loss_ct", "loss_dsm", "num_scales", "grad_norm", "images_per_sec"):
        assert all(np.isfinite(row[key]) for row in rows), key
    # N(k) with K = 8 curriculum steps: K' = floor(8 / 8) = 1, so N doubles every step from
    # s0 + 1.
    assert [row["num_scales"] for row in rows] == [11, 21, 41, 81]
    for row in rows:
        assert row["loss"] == pytest.approx(row["loss_ct"] + 0.3 * row["loss_dsm"], rel=1e-5)
    config = open(os.path.join(workdir, "config.gin")).read()
    assert "train.num_steps = 4" in config and "ICTConfig.head = 'joint'" in config
    for tag in ("1step", "2step"):
        png = os.path.join(workdir, "samples", f"{tag}_0000004.png")
        assert Image.open(png).size[0] > 16
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "4"
    assert "img/s" in r.stderr  # the progress line


@pytest.mark.parametrize(
    "binding, message",
    [
        ("train.num_stepz=3", "num_stepz"),
        ("NoSuchThing.x=1", "NoSuchThing"),
        ("ICTConfig.head='sideways'", "sideways"),
    ],
)
def test_bad_binding_is_a_usage_error(tmp_path, binding, message):
    r = run_trainer(
        ["--gin", "gin/smoke.gin", "--workdir", str(tmp_path), "--gin_bindings", binding]
    )
    assert r.returncode == exit_codes.USAGE, r.stderr
    assert message in r.stderr
    assert "compiled" not in r.stderr  # failed before any compilation
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_missing_gin_file(tmp_path):
    r = run_trainer(["--gin", "gin/nope.gin", "--workdir", str(tmp_path)])
    assert r.returncode == exit_codes.USAGE
    assert "nope.gin" in r.stderr and "not found" in r.stderr


def test_short_form_bindings_and_module_entry(tmp_path):
    r = run_trainer(
        [
            "--gin",
            "gin/smoke.gin",
            "--workdir",
            str(tmp_path),
            *QUIET,
            "--gin.train.num_steps=2",
            "--gin.ICTConfig.head='none'",
        ]
    )
    assert r.returncode == 0, r.stderr
    rows = read_metrics(str(tmp_path))
    assert rows[-1]["step"] == 2 and "loss_dsm" not in rows[-1]

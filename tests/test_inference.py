"""Evaluation end to end: FID in the training loop, W&B offline, and `--only_inference`.

Inception runs with random weights here (the real ones are checked against TorchScript in
tests/test_fid_inception.py); what is under test is the plumbing: sharded sampling into sharded
Inception, the metrics rows, the W&B run directory and the inference outputs.
"""

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from jcdm.fid.convert import save_npz
from jcdm.fid.fid import save_stats
from jcdm.fid.inception import flatten, init_params
from tests.trainer import read_metrics, run_trainer

pytestmark = pytest.mark.slow  # every test here starts a trainer process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    weights = save_npz(
        {k: np.asarray(v) for k, v in flatten(init_params(0)).items()}, root / "inception.npz"
    )
    stats = root / "ref.npz"
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    save_stats(stats, rng.normal(size=2048), a @ a.T / 64 + 1e-3 * np.eye(2048))
    workdir = str(root / "run")
    env = {"JCDM_INCEPTION_WEIGHTS": str(weights), "WANDB_MODE": "offline"}
    args = [
        "--gin",
        "gin/smoke.gin",
        "--workdir",
        workdir,
        "--gin.train.num_steps=4",
        "--gin.train.curriculum_steps=8",  # the suite's shared smoke train step (no new compile)
        "--gin.FIDConfig.every=4",
        "--gin.FIDConfig.num_samples=8",  # one batch: one Inception program for both runs
        "--gin.FIDConfig.batch_size=8",
        f"--gin.FIDConfig.stats='{stats}'",
        "--gin.WandbConfig.mode='offline'",
    ]
    r = run_trainer(args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return workdir, env, stats


def test_fid_is_logged(trained):
    workdir, _, _ = trained
    rows = read_metrics(workdir)
    fid_rows = [r for r in rows if "fid_1step" in r]
    assert len(fid_rows) == 1 and fid_rows[0]["step"] == 4
    assert np.isfinite(fid_rows[0]["fid_1step"]) and np.isfinite(fid_rows[0]["fid_2step"])
    assert fid_rows[0]["fid_1step"] > 0


def test_wandb_offline_run_directory(trained):
    workdir, _, _ = trained
    runs = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
    assert len(runs) == 1
    run_id = open(os.path.join(workdir, "run_id")).read().strip()
    blob = open(glob.glob(os.path.join(runs[0], f"run-{run_id}.wandb"))[0], "rb").read()
    for key in (b"loss_ct", b"loss_dsm", b"grad_norm", b"fid_1step", b"samples/1step"):
        assert key in blob, key


def test_only_inference_writes_samples(trained):
    workdir, env, stats = trained
    r = run_trainer(
        [
            "--gin",
            "gin/smoke.gin",
            "--workdir",
            workdir,
            "--only_inference",
            "--gin.inference.num_samples=8",
            "--gin.inference.batch_size=8",
            "--gin.inference.sampler_steps=(1, 3)",  # 2 steps: the training loop's FID above
            "--gin.inference.head_sampler_steps=2",
            f"--gin.inference.fid_stats='{stats}'",
            "--gin.inference.fid_seed_sets=2",
        ],
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = os.path.join(workdir, "inference", "step_4")
    for tag in ("1step", "3step", "edm2"):
        images = np.load(os.path.join(out, f"samples_{tag}.npz"))["images"]
        assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
        assert Image.open(os.path.join(out, f"grid_{tag}.png")).size[0] > 16
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["step"] == 4
    assert results["sigmas_1step"] == pytest.approx([80.0])
    assert len(results["sigmas_3step"]) == 3 and results["sigmas_3step"][0] == pytest.approx(80.0)
    assert np.isfinite(results["fid_1step"]) and np.isfinite(results["fid_3step"])
    # EDM's protocol: independent seed sets, each reported, with their mean and minimum.
    sets = results["fid_1step_sets"]
    assert len(sets) == 2 and sets[0] != sets[1] and results["fid_1step"] == sets[0]
    assert results["fid_1step_min"] == min(sets)
    assert results["fid_1step_mean"] == pytest.approx(sum(sets) / 2)


def test_only_inference_without_checkpoints_is_an_error(tmp_path):
    r = run_trainer(["--gin", "gin/smoke.gin", "--workdir", str(tmp_path), "--only_inference"])
    assert r.returncode == 2
    assert "no checkpoints" in r.stderr

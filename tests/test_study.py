"""The study runner's pieces (tools/study.py, tools/studylib): equal initialisation across arms,
the statistics, the plan and what counts as a finished run. The study itself (real training runs)
is bench/results/study_digits.*; its threshold is checked by tests/test_sample_quality.py."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from jcdm import main
from jcdm.training import train as train_lib
from tools import study
from tools.studylib import stats


@pytest.fixture
def clean_gin():
    gin.clear_config(clear_constants=True)
    yield
    gin.clear_config(clear_constants=True)


def test_arms_share_the_backbone_init(clean_gin, repo):
    """Per seed the arms differ only in the head: the backbone's initial parameters are equal
    bitwise, whether the head is joint, vanilla or absent (its key is split off separately)."""
    main.parse_gin([os.path.join(repo, "gin", "demo.gin")], [])
    key = jax.random.key(3, impl="unsafe_rbg")  # what step.init_state draws for train.seed=3
    backbones = {}
    for mode in ("joint", "none"):  # 'vanilla' builds the same modules as 'joint'
        nets = train_lib.make_networks(image_shape=(16, 16, 1), head_mode=mode)
        params = nets.init_params(key, (16, 16, 1))
        assert ("head" in params) == (mode != "none")
        backbones[mode] = jax.tree.leaves(params["backbone"])
    assert sum(float(np.abs(np.asarray(x)).sum()) > 0 for x in backbones["none"]) > 10  # random
    for a, b in zip(backbones["joint"], backbones["none"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mean_ci_matches_the_t_table():
    m, lo, hi = stats.mean_ci([1.0, 2.0, 3.0])
    # t(0.975, 2) = 4.303; sd = 1; half width 4.303 / sqrt(3)
    assert m == 2.0 and hi - m == pytest.approx(4.3027 / np.sqrt(3), rel=1e-4)
    assert np.isnan(stats.mean_ci([5.0])[1])


def test_bootstrap_interval():
    m, lo, hi = stats.bootstrap_ci([-3.0, -2.0, -4.0, -3.5, -2.5])
    assert m == -3.0 and -4.0 <= lo < m < hi <= -2.0
    m, lo, hi = stats.bootstrap_ci([-1.0, 1.0, -1.0, 1.0])
    assert lo < 0 < hi  # no sign of a difference: the interval covers 0


def test_equal_compute_pairs_joint_with_more_ict_steps():
    steps = [80, 160, 240, 320, 400]
    assert stats.equal_compute_step(steps, steps, 4 / 3) == (240, 320)
    assert stats.equal_compute_step(steps, steps, 1.0) == (400, 400)
    assert stats.equal_compute_step([100], [500], 4 / 3) is None


def _args(**kw):
    base = dict(
        preset="digits", arm=[], binding=[], seeds="0,1,2", steps=None, evals=None, metric=None,
        num_samples=None, fid_stats=None, root="R", joint_cost=4 / 3,
    )  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_plan_and_commands_differ_only_in_the_arm():
    plan = study.make_plan(_args())
    assert plan["eval_steps"] == [80, 160, 240, 320, 400]
    cmds = {a: study.train_command(plan, a, 1) for a in plan["arms"]}
    assert "train.seed=1" in cmds["joint"] and "CheckpointConfig.save_every=80" in cmds["joint"]
    strip = lambda c: [x for x in c if "ICTConfig.head" not in x and "/seed" not in x]  # noqa: E731
    assert strip(cmds["joint"]) == strip(cmds["vanilla"]) == strip(cmds["ict"])
    assert "ICTConfig.head='none'" in cmds["ict"]
    custom = study.make_plan(_args(arm=["a=gin/joint.gin", "b=gin/ict.gin:NUM_STEPS=5;X=1"]))
    assert custom["arms"]["b"] == {"gin": "gin/ict.gin", "bindings": ["NUM_STEPS=5", "X=1"]}
    with pytest.raises(SystemExit, match="multiple of"):
        study.make_plan(_args(steps=401))


def test_run_state_reads_committed_checkpoints(tmp_path):
    plan = study.make_plan(_args(root=str(tmp_path)))
    wd = tmp_path / "joint" / "seed0" / "checkpoints"
    assert study.run_state(plan, "joint", 0) == "new"
    (wd / "160").mkdir(parents=True)
    (wd / "160" / "commit_success.txt").write_text("")
    (wd / "240").mkdir()  # a save that never committed does not count
    assert study.run_state(plan, "joint", 0) == "partial (step 160)"
    (wd / "400").mkdir()
    (wd / "400" / "commit_success.txt").write_text("")
    assert study.run_state(plan, "joint", 0) == "trained"
    rows = __import__("json").dumps({str(s): {} for s in plan["eval_steps"]})
    (tmp_path / "joint" / "seed0" / "study_eval_digits_n500_s0.json").write_text(rows)
    assert study.run_state(plan, "joint", 0) == "trained"  # other settings: evaluate again
    (tmp_path / "joint" / "seed0" / "study_eval_digits_n1000_s0.json").write_text(rows)
    assert study.run_state(plan, "joint", 0) == "evaluated"


def test_explicit_evaluation_points_keep_a_checkpoint_at_each():
    plan = study.make_plan(_args(steps=6000, eval_steps="4500,6000,5000,5500"))
    assert plan["eval_steps"] == [4500, 5000, 5500, 6000]
    cmd = study.train_command(plan, "ict", 0)
    assert "CheckpointConfig.save_every=500" in cmd and "CheckpointConfig.keep=13" in cmd
    with pytest.raises(SystemExit, match="end at 6000"):
        study.make_plan(_args(steps=6000, eval_steps="1000,5000"))


def test_report_tables_and_plot(tmp_path):
    """Synthetic evaluations with a known answer: joint is 10 lower than vanilla on every seed,
    ict equal to joint at equal steps; the tables and the PNG come out with those numbers."""
    from tools.studylib import report

    plan = study.make_plan(_args(root=str(tmp_path)))
    rng = np.random.default_rng(0)
    evals = {}
    for seed in plan["seeds"]:
        noise = rng.normal(size=len(plan["eval_steps"]))
        for arm, offset in (("joint", 0.0), ("vanilla", 10.0), ("ict", 0.0)):
            evals[(arm, seed)] = {
                str(s): {
                    smp: {"fd": 1000.0 / s + offset + n, "classes": 9, "evenness": 0.9,
                          "nn_rms": 0.3}
                    for smp in ("1step", "2step")
                }
                for s, n in zip(plan["eval_steps"], noise)
            }  # fmt: skip
    result = report.collect(plan, evals)
    summary = report.summarize(result, key="fd", ratio=4 / 3)
    paired = summary["paired"]
    jv = paired["joint-vanilla equal steps 1step"]
    assert jv["diffs"] == pytest.approx([-10.0] * 3) and jv["low"] == pytest.approx(-10.0)
    assert paired["joint-ict equal steps 2step"]["mean"] == pytest.approx(0.0)
    ec = paired["joint-ict equal compute (joint 240 vs ict 320) 1step"]
    assert ec["mean"] == pytest.approx(1000 / 240 - 1000 / 320, abs=3.0)  # noise differs by step
    report.write(result, summary, tmp_path / "out", title="t")
    md = (tmp_path / "out.md").read_text()
    assert "| vanilla | 3 |" in md and "-10.00, -10.00, -10.00" in md
    assert (tmp_path / "out.png").stat().st_size > 10_000


def test_flatness_tells_a_plateau_from_a_slope(tmp_path, repo):
    """Over the last quarter of the run: a 20% fall is falling; noise of +-2% around a constant
    is flat, so is a sure but small decline (2%); a 10% rise is rising (no longer falling); a
    drop before the window does not count; seeds that disagree around -5% leave it
    undetermined. The Markdown says which."""
    from tools.studylib import report

    plan = study.make_plan(_args(root=str(tmp_path), steps=800, evals=8))
    for extra in ("slow", "noisy"):
        plan["arms"][extra] = plan["arms"]["ict"]
    assert plan["eval_steps"][-1] == 800
    evals = {}
    for seed, wobble, noisy in zip(plan["seeds"], (0.02, -0.01, 0.015), (-0.15, 0.05, -0.05)):
        for arm, fn in (
            ("joint", lambda s: 100.0 * (0.8 if s == 800 else 1.0)),  # -20% at the end
            # +-2% at the end, after a halving at step 300, before the last quarter
            ("ict", lambda s, w=wobble: 50.0 * (2.0 if s <= 300 else 1.0 + (w if s == 800 else 0))),
            ("vanilla", lambda s: 40.0 * (1.1 if s == 800 else 1.0)),  # +10%: no fall
            ("slow", lambda s: 30.0 * 0.98 ** ((s - 600) / 200)),  # -2% over the quarter
            ("noisy", lambda s, w=noisy: 20.0 * (1.0 + (w if s == 800 else 0.0))),
        ):
            evals[(arm, seed)] = {
                str(s): {
                    smp: {"fd": fn(s), "classes": 10, "evenness": 0.9, "nn_rms": 0.3}
                    for smp in ("1step", "2step")
                }
                for s in plan["eval_steps"]
            }
    flat = report.flatness(report.collect(plan, evals), key="fd")
    assert flat["window"] == [600, 700, 800] and (flat["from_step"], flat["to_step"]) == (600, 800)
    joint = flat["arms"]["joint"]["1step"]
    assert joint["mean"] == pytest.approx(-0.2) and joint["last_interval"]["mean"] == pytest.approx(
        -0.2
    )
    assert joint["verdict"] == "falling" and joint["falling"] and not joint["flat"]
    ict = flat["arms"]["ict"]["2step"]
    assert ict["changes"] == pytest.approx([0.02, -0.01, 0.015]) and ict["verdict"] == "flat"
    vanilla = flat["arms"]["vanilla"]["1step"]
    assert vanilla["verdict"] == "rising" and vanilla["flat"] and not vanilla["falling"]
    slow = flat["arms"]["slow"]["1step"]
    assert slow["mean"] == pytest.approx(-0.02) and slow["verdict"] == "flat"
    assert slow["last_interval"]["mean"] == pytest.approx(0.98**0.5 - 1)
    noisy = flat["arms"]["noisy"]["1step"]
    assert noisy["mean"] == pytest.approx(-0.05) and noisy["verdict"] == "undetermined"
    summary = report.summarize(report.collect(plan, evals), key="fd", ratio=4 / 3)
    plateau = summary["paired"]["joint-ict mean over steps 600-800 1step"]  # 93.3 vs 50 (1 + w/3)
    assert plateau["steps"] == [600, 700, 800]
    assert plateau["diffs"] == pytest.approx(
        [280 / 3 - 50 - 50 * w / 3 for w in (0.02, -0.01, 0.015)]
    )
    md = report.markdown(summary)
    assert "| joint | 1step | -20.0%, -20.0%, -20.0% | -20.0% [-20.0%, -20.0%] | falling |" in md
    assert "| ict | 1step | +2.0%, -1.0%, +1.5% | +0.8% [" in md
    assert "| vanilla | 2step | +10.0%, +10.0%, +10.0% | +10.0% [+10.0%, +10.0%] | rising |" in md
    assert "| noisy | 2step | -15.0%, +5.0%, -5.0% | -5.0% [" in md and "undetermined" in md

    # A study whose workdirs are gone: its JSON alone gives the same report again.
    study.write_report(report.collect(plan, evals), str(tmp_path / "first"))
    cmd = [sys.executable, os.path.join(repo, "tools", "study.py"), "--from-json"]
    subprocess.run([*cmd, str(tmp_path / "first.json"), "--out", str(tmp_path / "again")],
                   check=True, capture_output=True, cwd=repo)  # fmt: skip
    again = (tmp_path / "again.md").read_text()
    assert again == (tmp_path / "first.md").read_text() and "| noisy | 2step |" in again
    assert (tmp_path / "again.png").stat().st_size > 10_000

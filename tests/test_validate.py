"""The validation layer (jcdm.training.validate), in-process and fast: every bad binding or
command-line value of the issue's families exits 2 before anything is written, with a message
naming the binding, the value and the fix, and leaves the workdir byte-identical."""

from __future__ import annotations

import hashlib
import inspect
import logging
import os

import gin
import pytest
from gin import config as gin_config

from jcdm import exit_codes, main
from jcdm.runtime import preemption
from jcdm.training import validate

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMOKE = os.path.join(REPO, "gin", "smoke.gin")


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config(clear_constants=True)
    yield
    gin.clear_config(clear_constants=True)


def tree_digest(root) -> str:
    """A hash of every name, mode and byte under `root` (the folder itself included)."""
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        h.update(f"D {os.path.relpath(d, root)} {os.stat(d).st_mode:o}\n".encode())
        for f in sorted(files):
            p = os.path.join(d, f)
            h.update(f"F {os.path.relpath(p, root)} {os.stat(p).st_mode:o}\n".encode())
            with open(p, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


@pytest.fixture
def workdir(tmp_path):
    """A workdir of an earlier run: a bad restart must leave it byte-identical."""
    w = tmp_path / "run"
    (w / "checkpoints").mkdir(parents=True)
    (w / "run_id").write_text("abc123\n")
    (w / "config.gin").write_text("train.num_steps = 8\n")
    return w


def run_main(argv, capsys):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = main.run(argv)
    finally:
        preemption.uninstall()  # run() owns SIGTERM from its first line, as the CLI does
        root.handlers[:], root.level = handlers, level  # run() points logging at this stderr
    return code, capsys.readouterr().err


def test_every_gin_parameter_has_a_rule():
    import jcdm.register  # noqa: F401

    missing = []
    for c in gin_config._REGISTRY._selector_map.values():
        if not (c.module or "").startswith("jcdm"):
            continue
        skip = set(c.denylist or ()) | set(validate.UNCHECKED.get(c.name, ()))
        for name in inspect.signature(c.wrapped).parameters:
            if name not in skip and name not in validate.RULES.get(c.name, {}):
                missing.append(f"{c.name}.{name}")
    assert missing == [], f"add a rule to validate.RULES (or UNCHECKED) for {missing}"


@pytest.mark.parametrize(
    "binding, named",
    [
        ("train.num_steps=0", "train.num_steps=0 (int): must be an integer >= 1"),
        ("train.num_steps=-5", "train.num_steps=-5 (int): must be an integer >= 1"),
        ("train.num_steps=2.5", "train.num_steps=2.5 (float): must be an integer >= 1"),
        ("train.num_steps='ten'", "train.num_steps='ten' (str): must be an integer >= 1"),
        ("train.global_batch_size=-64", "train.global_batch_size=-64 (int)"),
        ("train.num_steps=True", "train.num_steps=True (bool)"),
        ("train.seed=1099511627776", "train.seed=1099511627776 (int): must be an integer >= 0 and"),
        ("train.ema_decay=1.5", "train.ema_decay=1.5 (float): must be a finite number >= 0.0"),
        ("ICTConfig.head='sideways'", "ICTConfig.head='sideways' (str): must be one of"),
        ("make_train_iterator.worker_count=-1", "make_train_iterator.worker_count=-1"),
        ("CheckpointConfig.keep=0", "CheckpointConfig.keep=0"),
        ("EvalConfig.every=2.0", "EvalConfig.every=2.0 (float)"),
        ("FIDConfig.batch_size='500'", "FIDConfig.batch_size='500' (str)"),
        ("make_optimizer.learning_rate=float('nan')", None),  # gin refuses the call itself
        ("make_optimizer.learning_rate=-1e-4", "make_optimizer.learning_rate=-0.0001"),
        ("NCSNpp.ch_mult=(2, 0)", "NCSNpp.ch_mult=(2, 0) (tuple)"),
        ("ICTConfig.s0=2000", "ICTConfig needs s0 <= s1"),
        ("inference.checkpoint_step='newest'", "inference.checkpoint_step='newest'"),
    ],
)
def test_bad_binding_exits_2_naming_it_and_the_fix_and_writes_nothing(
    binding, named, workdir, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    before = tree_digest(workdir)
    code, err = run_main(
        ["--gin", "gin/smoke.gin", "--workdir", str(workdir), "--gin_bindings", binding], capsys
    )
    assert code == exit_codes.USAGE, err
    if named is not None:
        assert named in err
        assert "e.g. --gin." in err or "needs" in err  # the fix, in a form that can be copied
    assert tree_digest(workdir) == before


def test_all_problems_are_reported_at_once_with_a_copyable_fix():
    main.parse_gin([SMOKE], ["train.num_steps=2.5", "train.global_batch_size=-3"])
    with pytest.raises(validate.ConfigError) as e:
        validate.check_bindings()
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert "e.g. --gin.train.num_steps=1000" in lines[0]
    assert "train.global_batch_size=-3" in lines[1]


def test_huge_num_steps_and_the_shipped_configs_are_accepted():
    main.parse_gin([SMOKE], [f"train.num_steps={10**12}"])
    validate.check_bindings()
    for cfg in ("joint.gin", "demo.gin", "reference.gin", "vanilla.gin", "ict.gin"):
        gin.clear_config(clear_constants=True)
        main.parse_gin([os.path.join(REPO, "gin", cfg)], [])
        validate.check_bindings()


def test_missing_required_binding_is_named_for_training_only(tmp_path):
    bare = tmp_path / "bare.gin"
    bare.write_text("make_train_iterator.dataset = 'synthetic'\n")
    main.parse_gin([str(bare)], [])
    with pytest.raises(validate.ConfigError, match="binds no train.num_steps, train.global_batch"):
        validate.check_bindings()
    validate.check_bindings(training=False)  # --only_inference takes them from the checkpoint


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workdir", "FILE"], "is a file, not a folder"),
        (["--workdir", "FILE/sub"], "is a file, so the folder cannot be created"),
        (["--workdir", ""], "--workdir is empty"),
        (["--workdir", "  "], "--workdir is empty"),
        (["--workdir", "gs://"], "is not a bucket URL"),
        (["--workdir", "W", "--log_level", "INFOO"], "--log_level 'INFOO' is not a level"),
        (["--workdir", "W", "--run_id", "team/run"], "--run_id 'team/run'"),
        (["--workdir", "W", "--run_id", "a b"], "--run_id 'a b'"),
        (["--workdir", "W", "--run_id", "x" * 65], "1-64 letters"),
    ],
)
def test_bad_command_line_exits_2_and_touches_nothing(extra, message, tmp_path, capsys):
    (tmp_path / "FILE").write_text("mine\n")
    (tmp_path / "W").mkdir()
    argv = [
        a.replace("FILE", str(tmp_path / "FILE")).replace("W", str(tmp_path / "W")) for a in extra
    ]
    before = tree_digest(tmp_path)
    with pytest.raises(SystemExit) as e:
        main.parse_args(["--gin", "gin/smoke.gin", *argv])
    assert e.value.code == exit_codes.USAGE
    assert message in capsys.readouterr().err
    assert tree_digest(tmp_path) == before


def test_good_command_line_values_pass(tmp_path):
    for level in ("debug", "INFO", "warning"):
        validate.check_command_line(workdir=str(tmp_path), log_level=level, run_id="run-01.a_b")
    validate.check_command_line(workdir="gs://bucket/runs/x", log_level="INFO", run_id=None)
    validate.check_command_line(
        workdir=str(tmp_path / "new" / "deeper"), log_level="ERROR", run_id="x" * 64
    )


def test_dataset_smaller_than_one_batch_exits_2_before_the_workdir_exists(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    workdir = tmp_path / "new_run"
    argv = ["--gin", "gin/smoke.gin", "--workdir", str(workdir)]
    code, err = run_main([*argv, "--gin.DATA_DIR='synthetic:16x16x3:1'"], capsys)
    assert code == exit_codes.USAGE
    assert "holds 1 image(s), fewer than one global batch (train.global_batch_size=16)" in err
    assert not workdir.exists()

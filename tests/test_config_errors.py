"""Configuration errors, in-process and fast: what the command line and gin refuse, and that every
shipped config parses. The same errors through a real `python -m jcdm` process (exit code 2,
nothing compiled) are in tests/test_train.py, in the slow tier."""

from __future__ import annotations

import glob
import os

import gin
import pytest

from jcdm import exit_codes, main
from jcdm.runtime import preemption
from jcdm.training import evaluation
from jcdm.training import train as train_lib

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "gin", "*.gin")))


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config(clear_constants=True)
    yield
    gin.clear_config(clear_constants=True)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_parses_and_builds_its_settings(config, monkeypatch):
    monkeypatch.chdir(REPO)
    main.parse_gin([config], [])
    cfg = train_lib.ICTConfig()
    assert cfg.head in ("joint", "vanilla", "none")
    evaluation.EvalConfig(), evaluation.FIDConfig()  # their own checks pass
    assert gin.query_parameter("%NUM_STEPS") >= 1 and gin.query_parameter("train.global_batch_size")


@pytest.mark.parametrize(
    "binding, message",
    [
        ("train.num_stepz=3", "num_stepz"),
        ("NoSuchThing.x=1", "NoSuchThing"),
        ("train.num_steps=", "bad gin configuration"),
    ],
)
def test_unknown_or_malformed_binding_names_it_and_the_fix(binding, message):
    with pytest.raises(main.UsageError, match=message) as e:
        main.parse_gin([os.path.join(REPO, "gin", "smoke.gin")], [binding])
    assert "gin/joint.gin" in str(e.value)  # where to look up the right spelling


def test_missing_gin_file_says_where_configs_live():
    with pytest.raises(main.UsageError, match="nope.gin.*not found.*configs live in"):
        main.parse_gin(["gin/nope.gin"], [])


def test_bad_value_is_refused_when_its_config_is_built():
    main.parse_gin([os.path.join(REPO, "gin", "smoke.gin")], ["ICTConfig.head='sideways'"])
    with pytest.raises(ValueError, match="ICTConfig.head='sideways'; choose one of"):
        train_lib.ICTConfig()


def test_command_line_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_args(["--gin", "gin/smoke.gin", "--workdir", "w", "--gin.train.num_steps"])
    assert e.value.code == exit_codes.USAGE
    assert "--gin.KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main.parse_args(["--workdir", "w"])
    assert e.value.code == exit_codes.USAGE
    args = main.parse_args(["--gin", "a.gin", "--workdir", "rel", "--gin.train.seed=3"])
    assert os.path.isabs(args.workdir) and args.gin_bindings == ["train.seed=3"]


def test_run_maps_a_bad_binding_to_exit_2_before_starting_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["--gin", "gin/smoke.gin", "--workdir", str(tmp_path), "--gin.train.num_stepz=3"]
    try:
        code = main.run(argv)
    finally:
        preemption.uninstall()  # run() owns SIGTERM from its first line, as the CLI does
    assert code == exit_codes.USAGE
    assert "num_stepz" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing written, nothing compiled

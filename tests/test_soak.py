"""The fault-injection soak's short schedule (bench/soak.py, issue #14 item 1): one fault of each
signal kind on a 2-process run, restarted by the launchers' exit-code policy, must end bitwise
equal to an uninterrupted run with exactly one metrics row per step; a SIGTERM loses nothing and
a SIGKILL at most a save interval plus the steps trained while that save was in flight."""

from __future__ import annotations

import os

import pytest

from bench import soak

pytestmark = pytest.mark.slow


def test_short_soak_survives_one_fault_of_each_signal_kind(repo, tmp_path):
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")  # the tests' shared cache (conftest)
    rep = soak.main(
        [
            "--schedule",
            "short",
            "--workdir",
            str(tmp_path),
            *(["--compile_cache", cache] * bool(cache)),
        ]
    )
    cfg = soak.SCHEDULES["short"]
    assert rep["faults_injected"] == len(cfg["kinds"]) >= 4
    assert rep["fault_kinds"] == sorted(soak.SIGNAL_KINDS)
    assert rep["restarts"] == rep["faults_injected"]  # each fault cost exactly one restart
    assert rep["final"] == {
        "step": cfg["num_steps"],
        "params_bitwise_equal": True,
        "ema_bitwise_equal": True,
        "one_row_per_logged_step": True,
        "metrics_equal_reference": True,
    }
    lost = rep["steps_lost_per_kind"]
    assert lost["sigterm"]["max"] == 0
    # A kill while a save is still being written loses that save too: at most the steps trained
    # while it was in flight (a save of the smoke state takes about a step here) on top.
    assert lost["sigkill"]["max"] <= cfg["save_every"] + 2
    assert lost["sigkill_all_in_save"]["max"] <= 2 * cfg["save_every"]
    for f in rep["faults"]:
        assert f["action"] == ("resume" if f["kind"] == "sigterm" else "retry"), f
        assert f["first_exit_s"] < 30, f  # SIGSTOP: the 10 s heartbeat silence, plus grace
    assert 0 < rep["goodput"] < 1

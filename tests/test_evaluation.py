"""Evaluation settings and cadence (in-process, no compile)."""

import pytest

from jcdm.training.evaluation import EvalConfig, FIDConfig, crossed


def test_crossed_fires_once_per_multiple_whatever_the_stride():
    for stride in (1, 3, 4):
        steps = range(stride, 40 + stride, stride)
        fired = [s for s in steps if crossed(s, 10, stride)]
        assert len(fired) == 4, (stride, fired)
        # each firing is the first call at or past the multiple
        assert all(s % 10 < stride for s in fired)
    assert not any(crossed(s, 0, 1) for s in range(1, 20))


def test_fid_without_statistics_is_refused_with_the_tool_to_make_them():
    with pytest.raises(ValueError, match="tools/fid_stats.py"):
        FIDConfig(every=100)
    assert FIDConfig(every=100, stats="ref.npz").every == 100


@pytest.mark.parametrize("kw", [{"every": -1}, {"num_grid_samples": 0}, {"head_heun_steps": -2}])
def test_bad_eval_settings_are_refused(kw):
    with pytest.raises(ValueError, match="EvalConfig needs"):
        EvalConfig(**kw)

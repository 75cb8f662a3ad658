"""Test-wide settings. They must be in the environment before JAX is imported, and they reach
every trainer subprocess the tests start."""

import os
import sys

import pytest

# XLA:CPU's LLVM optimisation dominates compile time here (a tiny train step: 82 s at the default
# level, 34 s at level 0, same step time); tests trade run-time speed for compile speed.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# A persistent compilation cache shared by every test and subprocess of one session: identical
# programs (the smoke train step on the same mesh) compile once.
_cache = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax-compile-cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_cache))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)


# The slow tier's most expensive files, most expensive first (CPU seconds with a cold compile
# cache, tests/README.md "Suite timings"). Under pytest-xdist (tests/run.sh: two workers, one
# file each at a time, in this order) a long file that started last would run alone at the end.
HEAVY_FIRST = (
    "test_soak.py",
    "test_checkpoint.py",
    "test_precision.py",
    "test_multihost.py",
    "test_train.py",
    "test_stall.py",
    "test_inference.py",
    "test_compile_cache.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def repo() -> str:
    return REPO


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skipped test is a failure: every optional tool (torch, shellcheck, the FID
    weights) is installed by tests/run.sh, so a skip there means a broken install step."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {report.longrepr}"

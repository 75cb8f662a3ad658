"""Test-wide settings. They must be in the environment before JAX is imported, and they reach
every trainer subprocess the tests start."""

import itertools
import json
import os
import resource
import sys
import time

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
    "test_sample_quality.py",
    "test_checkpoint.py",  # before test_multihost.py: it compiles their shared FSDP program
    "test_bucket.py",
    "test_multihost.py",
    "test_precision.py",
    "test_inference.py",
    "test_integrity_trainer.py",
    "test_train.py",
    "test_stall.py",
    "test_workdir_owner.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def repo() -> str:
    return REPO


def _cpu_seconds() -> float:
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """JCDM_TEST_CPU_LOG=FILE: one JSON line per test with its CPU seconds (this process and
    every subprocess it waited for, trainers under launch_local included) and wall seconds.
    A module fixture counts in its first test. `python tests/cpu_report.py FILE` sums them per
    file: the suite's budget is CPU, not wall time (tests/README.md, "Suite timings")."""
    path = os.environ.get("JCDM_TEST_CPU_LOG")
    cpu0, wall0 = _cpu_seconds(), time.monotonic()
    yield
    if path:
        row = {
            "test": item.nodeid,
            "cpu_s": round(_cpu_seconds() - cpu0, 2),
            "wall_s": round(time.monotonic() - wall0, 2),
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        }
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skipped test is a failure: every optional tool (torch, shellcheck, the FID
    weights) is installed by tests/run.sh, so a skip there means a broken install step."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {report.longrepr}"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real fake-gcs-server (tests/gcs_server.py) for the whole session, started on first use.
    Its environment is set in this process too (and gcsfs's cached instances dropped), so
    in-process clients reach it as the trainer subprocesses do."""
    from tests.gcs_server import GCSServer

    server = GCSServer(tmp_path_factory.mktemp("gcs") / "objects")
    server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    _drop_cached_bucket_clients()
    try:
        yield server
    finally:
        server.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _drop_cached_bucket_clients()


def _drop_cached_bucket_clients() -> None:
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


_bucket_numbers = itertools.count()


@pytest.fixture
def bucket(gcs_server, request) -> str:
    """A new, empty bucket on the session's server: `gs://NAME`."""
    import re

    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return gcs_server.create_bucket(f"{name}-{next(_bucket_numbers)}")

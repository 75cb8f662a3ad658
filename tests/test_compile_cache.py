"""The persistent compilation cache for restarts (issue #14, item 5): on by default under the
workdir, and hit by every process of a multi-process run on a restart (JAX 0.10.2's CPU cache key
differed between processes; jcdm.runtime.compile_cache makes it the same)."""

from __future__ import annotations

import os
import re
import subprocess

import jax
import pytest

from jcdm.runtime import compile_cache
from tests.trainer import launch_local_argv


@pytest.fixture
def restore_jax_cache_config():
    saved = {
        k: getattr(jax.config, k)
        for k in ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
    }
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_location_and_switch(tmp_path, monkeypatch, restore_jax_cache_config):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    got = compile_cache.compile_cache(workdir=str(tmp_path))
    assert got == os.path.join(str(tmp_path), "compile_cache")  # on by default, with the run
    assert jax.config.jax_compilation_cache_dir == got and jax.config.jax_enable_compilation_cache
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    assert compile_cache.compile_cache(workdir=str(tmp_path)) == "/elsewhere"
    assert compile_cache.compile_cache(workdir=str(tmp_path), directory="gs://b/c") == "gs://b/c"
    assert compile_cache.compile_cache(workdir=str(tmp_path), enabled=False) is None
    assert not jax.config.jax_enable_compilation_cache


ARGS = [
    "--gin", "gin/smoke.gin", "--gin.EvalConfig.every=0", "--gin.train.curriculum_steps=8",
    "--gin.CheckpointConfig.save_every=100000",
]  # fmt: skip


@pytest.mark.slow
def test_every_process_of_a_restarted_run_hits_the_cache(repo, tmp_path):
    workdir, cache = str(tmp_path / "w"), str(tmp_path / "cache")
    env = {**os.environ, "JAX_EXPLAIN_CACHE_MISSES": "true"}
    outs = []
    for steps in (2, 3):  # the second run resumes from step 2 and compiles the same program
        argv = launch_local_argv(
            2, 2, [*ARGS, f"--gin.train.num_steps={steps}",
                   f"--gin.compile_cache.directory='{cache}'"], workdir,
        )  # fmt: skip
        r = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-4000:]
        outs.append(r.stdout)
    first, second = outs
    miss = r"\[p{}\] .*PERSISTENT COMPILATION CACHE MISS for 'jit_train_step'"
    assert re.search(miss.format(0), first) and re.search(miss.format(1), first)
    assert re.search(r"\[p0\] .*Writing jit_train_step to persistent compilation cache", first)
    assert "resumed from step 2" in second
    for p in (0, 1):
        assert not re.search(miss.format(p), second), second[-4000:]
    times = [
        {int(p): float(c) for p, c in re.findall(r"\[p(\d)\] .*first step .* compile ([\d.]+)s", o)}
        for o in outs
    ]
    print(f"\ntrain-step compile per process: cold {times[0]}, restart {times[1]}")

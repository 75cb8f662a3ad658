"""The persistent compilation cache for restarts (issue #14, item 5): on by default under the
workdir, and hit by every process of a multi-process run on a restart (JAX 0.10.2's CPU cache key
differed between processes; jcdm.runtime.compile_cache makes it the same). The restart's hits,
on every process, are asserted where real 2-process runs restart anyway: tests/test_checkpoint.py
(a local cache: the launches after the first hit it on both processes) and tests/test_bucket.py
(the cache in a bucket). `bench/soak.py` reports each restart's misses."""

from __future__ import annotations

import os

import jax
import pytest

from jcdm.runtime import compile_cache


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

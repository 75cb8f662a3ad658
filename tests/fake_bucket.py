"""A fake `gs://` bucket for tests: fsspec's in-memory filesystem registered for the gs/gcs
protocols, which `etils.epath` (and so `jcdm.runtime.io`) uses for bucket URLs when TensorFlow is
not installed. Nothing touches the network; every object lives in `FakeGCS.store`."""

from __future__ import annotations

import contextlib

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}  # its own, not MemoryFileSystem's
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's keyword, ignored
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        path = path.strip("/")
        return "/" + path if path else ""


@contextlib.contextmanager
def fake_gcs():
    """Route gs:// through FakeGCS; yields its object store ({"/bucket/key": MemoryFile})."""
    from etils.epath import backend, gpath

    if gpath._is_tf_installed():  # epath would pick tf.io.gfile, which this fake cannot serve
        import pytest

        pytest.skip("TensorFlow is installed: epath routes gs:// through tf.io.gfile")
    from fsspec.registry import _registry

    saved = {p: _registry.get(p) for p in ("gs", "gcs")}
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, FakeGCS, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield FakeGCS.store
    finally:
        for p, impl in saved.items():
            if impl is None:
                _registry.pop(p, None)
            else:
                _registry[p] = impl
        backend.fsspec_backend._get_filesystem.cache_clear()
        FakeGCS.store.clear()


def objects(store: dict) -> list[str]:
    """The object keys, as gs:// URLs, sorted."""
    return sorted("gs:/" + k for k in store)

"""Every file the trainer, inference and tools write goes through here (system code).

Paths may be local or bucket URLs (`gs://...`, through `etils.epath`, which Orbax uses too), so
a bucket workdir receives every output instead of a local folder named `gs:`. Writes are atomic:
a reader never sees half a file, whatever kills the writer.

- Local: the bytes go to a uniquely named temporary file in the same folder, which is flushed,
  fsynced and renamed over the target (`os.replace` is atomic on POSIX); a failed write removes
  its temporary file. The file gets 0666 & ~umask, as `open()` would give it (not mkstemp's 0600).
- Bucket: an object appears whole when its upload completes, so the object is written directly.

Errors are OSErrors naming the path (a disk-full or permission error without a file name gets
one), so a caller's message can say which file could not be written and why.

`gs://` goes through gcsfs (a base dependency): `missing_bucket_client` names the pip command when
it is absent, and gcsfs's listing cache is off, because TensorStore (Orbax's array writer) and
other processes add objects behind gcsfs's back and a cached listing would hide them.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tempfile
from typing import Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike

# The pip package that serves each bucket scheme through etils.epath (fsspec).
BUCKET_CLIENTS = {"gs": "gcsfs"}


def _configure_bucket_clients() -> None:
    # fsspec applies these defaults when epath first creates its gcsfs instance.
    import fsspec.config

    for scheme in ("gs", "gcs"):
        fsspec.config.conf.setdefault(scheme, {}).setdefault("use_listings_cache", False)


_configure_bucket_clients()


def path(p: PathLike) -> epath.Path:
    """`p` as an `epath.Path` (local path or bucket URL)."""
    return p if isinstance(p, epath.Path) else epath.Path(p)


def is_local(p: PathLike) -> bool:
    """True for a local path, False for a bucket URL (`scheme://...`)."""
    return "://" not in os.fspath(p)


def missing_bucket_client(p: PathLike) -> str | None:
    """For a bucket URL whose client package is not installed, the message to show (with the pip
    command); None when `p` is local or its client is importable. Without this, the first bucket
    access deep inside a run raises an ImportError that the launchers would retry forever."""
    text = os.fspath(p)
    if is_local(text):
        return None
    scheme = text.split("://", 1)[0]
    package = BUCKET_CLIENTS.get(scheme)
    if package is not None and importlib.util.find_spec(package) is None:
        return (
            f"{text} needs the Python package {package}, which is not installed: run "
            f"`pip install {package}` (or reinstall jcdm: `pip install -e .` installs it)"
        )
    return None


def local_path_arg(text: str):
    """An argparse `type` for the few outputs that must be local files (ArrayRecord shards,
    converted weights): a bucket URL is refused with the way around it, instead of becoming a
    local folder named `gs:`."""
    import argparse
    from pathlib import Path

    if not is_local(text):
        raise argparse.ArgumentTypeError(
            f"{text} is a bucket URL; this output must be a local path: write it locally, then "
            "copy it with `gcloud storage cp -r LOCAL_DIR " + text + "`"
        )
    return Path(text)


def _named(e: OSError, p: PathLike) -> OSError:
    """The same error with the path filled in when the OS did not give one (e.g. ENOSPC)."""
    if e.filename is None and e.errno is not None:
        return type(e)(e.errno, e.strerror or str(e), os.fspath(p))
    return e


def write_bytes(p: PathLike, data: bytes, *, makedirs: bool = True) -> epath.Path:
    """Write `data` to `p` atomically; creates the parent folders unless `makedirs=False`."""
    target = path(p)
    if makedirs:
        mkdirs(target.parent)
    if not is_local(target):
        target.write_bytes(data)
        return target
    fd, tmp = tempfile.mkstemp(
        dir=os.fspath(target.parent), prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; outputs are shared like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data on a crash
        os.replace(tmp, os.fspath(target))
    except OSError as e:
        _remove_quietly(tmp)
        raise _named(e, target) from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    return target


def write_text(p: PathLike, text: str, *, makedirs: bool = True) -> epath.Path:
    return write_bytes(p, text.encode("utf-8"), makedirs=makedirs)


def write_json(p: PathLike, obj: Any, *, indent: int | None = 1) -> epath.Path:
    """JSON with a trailing newline; NaN/inf are written as JSON's extension tokens."""
    return write_text(p, json.dumps(obj, indent=indent) + "\n")


def write_npz(p: PathLike, **arrays: np.ndarray) -> epath.Path:
    """An uncompressed .npz of `arrays` (built in memory, then written atomically)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_bytes(p, buf.getvalue())


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_text(p: PathLike) -> str:
    return path(p).read_text()


def read_json(p: PathLike) -> Any:
    return json.loads(read_text(p))


def exists(p: PathLike) -> bool:
    return path(p).exists()


def mkdirs(p: PathLike) -> epath.Path:
    """Create folder `p` and its parents (a no-op in a bucket, where folders are prefixes)."""
    target = path(p)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _named(e, target) from e
    return target


def commit_local_file(partial: PathLike, final: PathLike) -> None:
    """Rename a finished local file (written by a library that needs a local path) into place."""
    if not (is_local(partial) and is_local(final)):
        raise ValueError(f"commit_local_file needs local paths, got {partial} -> {final}")
    os.replace(os.fspath(partial), os.fspath(final))


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it to read it
    back would race with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_quietly(p: str) -> None:
    try:
        os.remove(p)
    except OSError:
        pass

"""Where the workdir lease lives: compare-and-swap on one small object (system code; the lease's
logic is `jcdm.runtime.lease`).

- Local disk: created by `link(2)` of a finished temporary file (fails if the lease exists);
  replaced and deleted only under an `flock` of `<workdir>/LEASE.lock`, after checking the file is
  still the one read (inode and bytes); a replacement renames a finished temporary file over it,
  so a reader never sees half a record.
- `gs://`: object generation preconditions (`ifGenerationMatch=0` to create, the generation read
  to replace or delete) through google-cloud-storage's Blob API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import tempfile
from typing import Protocol

NAME = "LEASE"


@dataclasses.dataclass(frozen=True)
class Current:
    data: bytes
    version: object  # local: (inode, bytes); bucket: the object generation


class Store(Protocol):
    where: str

    def read(self) -> Current | None: ...

    def create(self, data: bytes) -> object | None:
        """The new version, or None if the object exists."""

    def replace(self, data: bytes, version: object) -> object | None:
        """The new version, or None if the object is no longer at `version`."""

    def delete(self, version: object) -> bool: ...


class LocalStore:
    def __init__(self, workdir: str):
        self.dir = workdir
        self.where = os.path.join(workdir, NAME)
        self._lock = self.where + ".lock"

    def read(self) -> Current | None:
        try:
            with open(self.where, "rb") as f:
                data = f.read()
                return Current(data, (os.fstat(f.fileno()).st_ino, data))
        except FileNotFoundError:
            return None

    def _finished_tmp(self, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # e.g. a full disk: leave no temporary file behind
            os.remove(tmp)
            raise
        return tmp

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
            yield
        finally:
            os.close(fd)

    def _version(self) -> object | None:
        # The inode and the bytes: an inode freed by a renewal may be reused by a later one, but
        # a renewal's record (its renewal time) is never written twice.
        current = self.read()
        return None if current is None else current.version

    def create(self, data: bytes) -> object | None:
        tmp = self._finished_tmp(data)
        try:
            with self._locked():
                os.link(tmp, self.where)  # atomic; EEXIST if another run got there first
                return self._version()
        except FileExistsError:
            return None
        finally:
            os.remove(tmp)

    def replace(self, data: bytes, version: object) -> object | None:
        tmp = self._finished_tmp(data)
        try:
            with self._locked():
                if self._version() != version:
                    return None
                os.replace(tmp, self.where)
                tmp = None
                return self._version()
        finally:
            if tmp is not None:
                os.remove(tmp)

    def delete(self, version: object) -> bool:
        with self._locked():
            if self._version() != version:
                return False
            os.remove(self.where)
            return True


class BucketStore:
    """`gs://BUCKET/PATH/LEASE` through google-cloud-storage ($STORAGE_EMULATOR_HOST reaches a
    local GCS API server): gcsfs, which the rest of the bucket I/O uses, offers no generation
    preconditions on writes."""

    def __init__(self, workdir: str):
        try:
            from google.api_core import exceptions
            from google.cloud import storage
        except ImportError as e:  # a configuration problem: exit 2, not a retry
            raise ValueError(
                f"a gs:// workdir needs google-cloud-storage for its lease ({e}); install the "
                "project with `pip install -e .` (it is a dependency) or `pip install "
                "google-cloud-storage`"
            ) from e

        self._exc = exceptions
        bucket, _, prefix = workdir[len("gs://") :].partition("/")
        self.where = f"{workdir.rstrip('/')}/{NAME}"
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project="local", credentials=AnonymousCredentials())
        else:
            client = storage.Client()
        self._bucket = client.bucket(bucket)
        self._name = f"{prefix.strip('/')}/{NAME}" if prefix.strip("/") else NAME

    def read(self) -> Current | None:
        for _ in range(5):  # the object may change between the metadata and the media read
            blob = self._bucket.get_blob(self._name)
            if blob is None:
                return None
            try:
                data = blob.download_as_bytes(if_generation_match=blob.generation)
            except (self._exc.PreconditionFailed, self._exc.NotFound):
                continue
            return Current(data, blob.generation)
        raise OSError(f"{self.where} kept changing while being read")

    def _upload(self, data: bytes, generation: int) -> object | None:
        blob = self._bucket.blob(self._name)
        try:
            blob.upload_from_string(
                data, content_type="application/json", if_generation_match=generation
            )
        except self._exc.PreconditionFailed:
            return None
        return blob.generation

    def create(self, data: bytes) -> object | None:
        return self._upload(data, 0)

    def replace(self, data: bytes, version: object) -> object | None:
        return self._upload(data, int(version))

    def delete(self, version: object) -> bool:
        try:
            self._bucket.blob(self._name).delete(if_generation_match=int(version))
        except (self._exc.PreconditionFailed, self._exc.NotFound):
            return False
        return True


def store_for(workdir: str) -> Store:
    if workdir.startswith("gs://"):
        return BucketStore(workdir)
    if "://" in workdir:
        raise ValueError(f"the workdir lease supports local paths and gs:// only, got {workdir}")
    os.makedirs(workdir, exist_ok=True)
    return LocalStore(workdir)

"""The on-disk image dataset: ArrayRecord shards plus `metadata.json`; its format and its reader.

Layout of one split directory (what `tools/prepare_cifar10.py` writes)::

    <dir>/metadata.json
    <dir>/<split>-00000-of-00008.array_record
    ...

Every record is `LABEL_BYTES` bytes of little-endian int32 label (-1 when the dataset has no
labels) followed by the image as `height * width * channels` uint8 values in HWC order. A fixed
record size lets a reader decode a whole batch with one `np.frombuffer` and detect a record of the
wrong size at once.

`jcdm.data.writer` writes `metadata.json` last, after every shard has been renamed into place,
so a directory without it is an interrupted conversion, never a short dataset. It lists each
shard's record count, byte size and SHA-256, which `ImageRecordSource` checks before training
starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from jcdm.data.spec import DataError, ImageSpec

METADATA_FILE = "metadata.json"
FORMAT_NAME = "jcdm.image_records"
FORMAT_VERSION = 1
LABEL_BYTES = 4
SHARD_SUFFIX = ".array_record"
# group_size:1 makes every record independently addressable, which global shuffling needs.
WRITER_OPTIONS = "group_size:1"
# Above this total size, checksums are skipped by default: hashing then costs more than it saves.
AUTO_VERIFY_MAX_BYTES = 2 << 30
_PREPARE_HINT = "Re-run `python tools/prepare_cifar10.py ...` (see its --help) to rebuild it."


def shard_name(split: str, index: int, count: int) -> str:
    """File name of shard `index` of `count` of `split`."""
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def encode_records(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """Serialises uint8 images [k, H, W, C] and int labels [k] into the fixed-size record format."""
    k = images.shape[0]
    rows = np.empty((k, LABEL_BYTES + images[0].size), np.uint8)
    rows[:, :LABEL_BYTES] = np.asarray(labels, "<i4").reshape(k, 1).view(np.uint8)
    rows[:, LABEL_BYTES:] = images.reshape(k, -1)
    return [row.tobytes() for row in rows]


class RecordSizeError(ValueError):
    """A record whose size does not match the metadata; `position` is its index in the batch."""

    def __init__(self, position: int, size: int, expected: int) -> None:
        super().__init__(f"record {position} of the batch has {size} bytes, not {expected}")
        self.position, self.size, self.expected = position, size, expected


def decode_records(records: Sequence[bytes], spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode_records`: returns (images uint8 [k, H, W, C], labels int32 [k]).

    Raises:
      RecordSizeError: a record is not `LABEL_BYTES + H*W*C` bytes long.
    """
    record_bytes = LABEL_BYTES + spec.image_bytes
    joined = b"".join(records)
    if len(joined) != record_bytes * len(records):
        sizes = [len(r) for r in records]
        bad = next(i for i, n in enumerate(sizes) if n != record_bytes)
        raise RecordSizeError(bad, sizes[bad], record_bytes)
    rows = np.frombuffer(joined, np.uint8).reshape(len(records), record_bytes)
    labels = rows[:, :LABEL_BYTES].copy().view("<i4").reshape(-1).astype(np.int32)
    images = rows[:, LABEL_BYTES:].reshape(len(records), *spec.shape)
    return images, labels


def find_split_dir(directory: str | os.PathLike, split: str = "train") -> Path:
    """Resolves a dataset directory: the split directory itself, or its parent.

    `prepare_cifar10.py` writes `<out>/train` and `<out>/test`; users may name either `<out>` or
    `<out>/train`.
    """
    path = Path(directory).expanduser()
    if str(directory).startswith(("gs://", "s3://", "http://", "https://")):
        raise DataError(
            f"dataset {directory}: remote paths are not read directly. Copy the split directory "
            "to local disk (`gsutil -m cp -r ...`) or mount the bucket (gcsfuse) and pass the "
            "local path."
        )
    if not path.is_dir():
        raise DataError(
            f"dataset directory {path} does not exist (or is not a directory). Create it with "
            "`python tools/prepare_cifar10.py cifar10 --archive cifar-10-python.tar.gz --out "
            f"{path.parent if path.name in ('train', 'test') else path}`, or pass 'synthetic' / "
            "'digits' to train without files."
        )
    if not (path / METADATA_FILE).exists() and (path / split / METADATA_FILE).exists():
        return path / split
    return path


def _load_metadata(directory: Path) -> dict[str, Any]:
    meta_path = directory / METADATA_FILE
    if not meta_path.exists():
        partial = sorted(p.name for p in directory.glob(f"*{SHARD_SUFFIX}"))
        what = (
            f"it holds {len(partial)} shard file(s) but no {METADATA_FILE}, which the converter "
            "writes last: the conversion was interrupted"
            if partial
            else f"it holds no {METADATA_FILE} and no shards"
        )
        raise DataError(f"{meta_path} is missing: {what}. {_PREPARE_HINT}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path} is not readable JSON ({e}). {_PREPARE_HINT}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DataError(f"{meta_path} is not a {FORMAT_NAME} metadata file. {_PREPARE_HINT}")
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{meta_path} has format version {meta.get('version')}; this code reads version "
            f"{FORMAT_VERSION}. {_PREPARE_HINT}"
        )
    int_keys = ("num_records", "height", "width", "channels", "record_bytes")
    bad = [k for k in int_keys if not isinstance(meta.get(k), int) or meta[k] <= 0]
    if bad or not isinstance(meta.get("shards"), list) or not meta["shards"]:
        raise DataError(
            f"{meta_path}: missing or invalid fields {bad or ['shards']}. {_PREPARE_HINT}"
        )
    if meta.get("dtype") != "uint8" or meta["record_bytes"] != LABEL_BYTES + (
        meta["height"] * meta["width"] * meta["channels"]
    ):
        raise DataError(
            f"{meta_path}: dtype {meta.get('dtype')!r} / record_bytes {meta['record_bytes']} do "
            f"not match uint8 {meta['height']}x{meta['width']}x{meta['channels']} images. "
            f"{_PREPARE_HINT}"
        )
    total = sum(int(s.get("num_records", 0)) for s in meta["shards"])
    if total != meta["num_records"]:
        raise DataError(
            f"{meta_path}: num_records is {meta['num_records']} but its shards list {total} "
            f"records. {_PREPARE_HINT}"
        )
    return meta


class ImageRecordSource:
    """Random access to the images of one split directory, validated when opened.

    Opening checks, in this order, and raises `DataError` naming the file on the first failure:
    the directory and `metadata.json` exist and parse; every listed shard exists and has the
    recorded byte size (catches truncation and partial copies); with `verify_checksums` on, each
    shard's SHA-256 matches; each shard opens and holds the recorded number of records; and its
    records have the recorded size (every record when verifying, else the first and last).

    Attributes:
      spec: image shape and record count.
      directory: the resolved split directory.
      metadata: the parsed `metadata.json`.
      label_names: class names indexed by label ([] if unlabeled).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        split: str = "train",
        verify_checksums: bool | None = None,
    ) -> None:
        """Opens and validates `directory` (or `directory/<split>`).

        Args:
          directory: a split directory written by `write_image_records`, or its parent.
          split: the subdirectory to use when `directory` is the parent.
          verify_checksums: hash every shard; None hashes only datasets up to 2 GiB.
        """
        self.directory = find_split_dir(directory, split)
        self.metadata = meta = _load_metadata(self.directory)
        self.spec = ImageSpec(meta["height"], meta["width"], meta["channels"], meta["num_records"])
        self.label_names: list[str] = list(meta.get("label_names", []))
        self._paths = [self.directory / str(s["file"]) for s in meta["shards"]]
        self._check_shards(verify_checksums)
        self._starts = np.cumsum([0] + [int(s["num_records"]) for s in meta["shards"]])
        self._readers: list[ArrayRecordReader | None] = [None] * len(self._paths)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Readers hold file handles: worker processes reopen them lazily.
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._readers = [None] * len(self._paths)
        self._lock = threading.Lock()

    def _reader(self, shard: int) -> ArrayRecordReader:
        reader = self._readers[shard]
        if reader is None:
            with self._lock:
                reader = self._readers[shard]
                if reader is None:
                    # Random access: no read-ahead, and no reader-side thread pool (the pipeline
                    # already reads batches in parallel threads or processes).
                    reader = ArrayRecordReader(
                        str(self._paths[shard]),
                        "readahead_buffer_size:0",
                        file_reader_buffer_size=32768,
                    )
                    if not reader.ok():
                        raise DataError(f"shard {self._paths[shard]} can no longer be opened")
                    self._readers[shard] = reader
        return reader

    def _check_shards(self, verify_checksums: bool | None) -> None:
        shards = self.metadata["shards"]
        for path, shard in zip(self._paths, shards, strict=True):
            if not path.is_file():
                raise DataError(
                    f"shard {path} listed in {self.directory / METADATA_FILE} is missing. Copy "
                    f"all {len(shards)} shards of the split together. {_PREPARE_HINT}"
                )
            size = path.stat().st_size
            if size != shard.get("bytes"):
                raise DataError(
                    f"shard {path} has {size} bytes but {METADATA_FILE} records "
                    f"{shard.get('bytes')}: the file is truncated or was replaced (an incomplete "
                    f"copy?). Copy it again or rebuild the dataset. {_PREPARE_HINT}"
                )
        total = sum(int(s["bytes"]) for s in shards)
        verify = verify_checksums or (verify_checksums is None and total <= AUTO_VERIFY_MAX_BYTES)
        for path, shard in zip(self._paths, shards, strict=True):
            if verify and sha256_file(path) != shard.get("sha256"):
                raise DataError(
                    f"shard {path} does not match the SHA-256 in {METADATA_FILE}: the file is "
                    f"corrupt or from another conversion. {_PREPARE_HINT}"
                )
            self._check_records(path, int(shard["num_records"]), every_record=verify)

    def _check_records(self, path: Path, expected_count: int, *, every_record: bool) -> None:
        """Checks the record count, and the size of the first and last (or every) record."""
        record_bytes = self.metadata["record_bytes"]
        try:
            reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
            try:
                if not reader.ok():
                    raise DataError(
                        f"shard {path} is not a readable ArrayRecord file. {_PREPARE_HINT}"
                    )
                count = reader.num_records()
                if count != expected_count:
                    raise DataError(
                        f"shard {path} holds {count} records but {METADATA_FILE} says "
                        f"{expected_count}: metadata and files do not match. {_PREPARE_HINT}"
                    )
                if every_record:
                    ranges = [(a, min(a + 4096, count)) for a in range(0, count, 4096)]
                else:
                    ranges = [(0, 1), (count - 1, count)]
                for start, end in ranges:
                    for offset, record in enumerate(reader.read(start, end)):
                        if len(record) != record_bytes:
                            raise DataError(
                                f"shard {path}: record {start + offset} has {len(record)} bytes, "
                                f"but {METADATA_FILE} says records are {record_bytes} bytes "
                                f"({self.spec.height}x{self.spec.width}x{self.spec.channels} "
                                f"uint8 + {LABEL_BYTES}-byte label). {_PREPARE_HINT}"
                            )
            finally:
                reader.close()
        except RuntimeError as e:  # what ArrayRecord/Riegeli raise for damaged files
            raise DataError(f"shard {path} is corrupt ({e}). {_PREPARE_HINT}") from e

    def __len__(self) -> int:
        return self.spec.num_records

    def __getitem__(self, index: int) -> np.ndarray:
        """The uint8 [H, W, C] image of record `index`."""
        return self.read_batch(np.asarray([index]))[0][0]

    def label(self, index: int) -> int:
        """The label of record `index` (-1 if the dataset is unlabeled)."""
        return int(self.read_batch(np.asarray([index]))[1][0])

    def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reads records `indices`: (uint8 images [k, H, W, C], int32 labels [k]).

        The images are a read-only view of the records just read; copy them to modify in place.
        """
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"record index out of range [0, {len(self)}) in {self.directory}")
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        records: list[bytes] = [b""] * len(indices)
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            positions = (indices[rows] - self._starts[shard]).tolist()
            try:
                shard_records = self._reader(int(shard)).read(positions)
            except RuntimeError as e:  # damaged after validation (or never hashed)
                raise DataError(
                    f"shard {self._paths[shard]} is corrupt ({e}). {_PREPARE_HINT}"
                ) from e
            for row, record in zip(rows.tolist(), shard_records, strict=True):
                records[row] = record
        try:
            return decode_records(records, self.spec)
        except RecordSizeError as e:
            index = int(indices[e.position])
            shard = int(np.searchsorted(self._starts, index, side="right")) - 1
            raise DataError(
                f"shard {self._paths[shard]}: record {index - self._starts[shard]} has {e.size} "
                f"bytes, but {METADATA_FILE} says records are {e.expected} bytes. {_PREPARE_HINT}"
            ) from e

"""Writes images as ArrayRecord shards plus `metadata.json` (format: `jcdm.data.records`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from jcdm.data.records import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LABEL_BYTES,
    METADATA_FILE,
    WRITER_OPTIONS,
    ImageRecordSource,
    encode_records,
    sha256_file,
    shard_name,
)
from jcdm.data.spec import DataError, ImageSpec
from jcdm.runtime import io

_SPLIT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHARD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*-\d{5}-of-\d{5}\.array_record")


def write_image_records(
    out_dir: str | os.PathLike,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    num_records: int,
    image_shape: tuple[int, int, int],
    num_shards: int,
    split: str,
    name: str,
    label_names: Sequence[str] = (),
    source: dict[str, Any] | None = None,
) -> Path:
    """Writes `num_records` images into `num_shards` ArrayRecord shards plus `metadata.json`.

    Records keep the order of `batches` and are split into contiguous, near-equal shards. The
    new split is built in a temporary sibling folder (`.<name>.building-*`) and verified
    (counts, sizes, checksums) before it replaces the files of the previous conversion, so a
    failed or interrupted conversion leaves the old split as it was. Only files this writer made
    are replaced or removed (metadata.json and the shards it lists); any other file in the folder
    stays, and one that a new file would overwrite is refused up front.

    Args:
      out_dir: directory of this split; created if missing.
      batches: yields (uint8 images [k, H, W, C], int labels [k]) in record order.
      num_records: total records `batches` yields (needed up front to size the shards).
      image_shape: (H, W, C) of every image.
      num_shards: shard files to write (clipped to `num_records`).
      split: split name, used in shard file names ("train", "test").
      name: dataset name recorded in the metadata ("cifar10").
      label_names: class names indexed by label; empty when the data has no labels.
      source: free-form description of the input (path, checksum), used to skip re-conversion.

    Returns:
      The path of the written metadata file.
    """
    out = Path(out_dir)
    if num_records <= 0:
        raise DataError(f"no records to write into {out}: the input is empty")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise DataError(
            f"the number of shards must be an integer >= 1 (--shards), got {num_shards}"
        )
    if not _SPLIT_RE.fullmatch(split):
        raise DataError(f"split name {split!r}: use letters, digits, '.', '_' or '-'")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, not a folder: choose another output path")
    num_shards = max(1, min(num_shards, num_records))
    new_files = [shard_name(split, k, num_shards) for k in range(num_shards)]
    owned = _files_of_previous_conversion(out)
    clash = [f for f in (*new_files, METADATA_FILE) if (out / f).exists() and f not in owned]
    if clash:
        raise DataError(
            f"{out} holds {clash}, which no earlier conversion listed in its {METADATA_FILE}; "
            "the converter does not overwrite files it did not write. Move them away or choose "
            "another output folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        _write_split(
            build, batches, num_records, image_shape, new_files, split, name, label_names, source
        )
        ImageRecordSource(build, verify_checksums=True)  # what a reader will check, before use
        _install(build, out, new_files, owned)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out / METADATA_FILE


def _files_of_previous_conversion(out: Path) -> set[str]:
    """metadata.json and the shards it lists, when `out` holds a split this writer made."""
    meta = out / METADATA_FILE
    if not meta.exists():
        return set()
    try:
        data = json.loads(meta.read_text())
        files = {str(s["file"]) for s in data["shards"]}
        ours = data.get("format") == FORMAT_NAME
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{meta} is not readable as a converted split's metadata ({e}), so which files "
            "belong to it is unknown; move the folder away or delete it, then convert again"
        ) from e
    if not ours:
        return set()  # someone else's metadata.json: refused as a clash if it would be replaced
    # Only names a writer gives its shards: a tampered metadata.json cannot make it delete more.
    return {METADATA_FILE} | {f for f in files if _SHARD_RE.fullmatch(f)}


def _write_split(
    folder: Path,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    num_records: int,
    image_shape: tuple[int, int, int],
    files: list[str],
    split: str,
    name: str,
    label_names: Sequence[str],
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    num_shards = len(files)
    bounds = [k * num_records // num_shards for k in range(num_shards + 1)]
    spec = ImageSpec(*image_shape, num_records)
    shards: list[dict[str, Any]] = []
    stream = _record_stream(batches, spec)
    for k, file in enumerate(files):
        final = folder / file
        writer = ArrayRecordWriter(str(final), WRITER_OPTIONS)
        try:
            for _ in range(bounds[k + 1] - bounds[k]):
                record = next(stream, None)
                if record is None:
                    raise DataError(f"the input for {split} ended before {num_records} records")
                writer.write(record)
        finally:
            writer.close()
        shards.append(
            {
                "file": file,
                "num_records": int(bounds[k + 1] - bounds[k]),
                "bytes": final.stat().st_size,
                "sha256": sha256_file(final),
            }
        )
    if next(stream, None) is not None:
        raise DataError(
            f"the input for {split} holds more than the {num_records} records announced"
        )
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": name,
        "split": split,
        "num_records": num_records,
        "height": spec.height,
        "width": spec.width,
        "channels": spec.channels,
        "dtype": "uint8",
        "record_layout": f"int32 little-endian label ({LABEL_BYTES} bytes), then HWC uint8 pixels",
        "record_bytes": LABEL_BYTES + spec.image_bytes,
        "label_names": list(label_names),
        "source": source or {},
        "shards": shards,
    }
    io.write_json(folder / METADATA_FILE, metadata, indent=2)
    return metadata


def _install(build: Path, out: Path, new_files: list[str], owned: set[str]) -> None:
    """Move a verified split from `build` into `out`, replacing the previous conversion's files.

    A new folder is one rename. Into an existing folder, the old metadata goes first and the new
    metadata last: an interruption in between leaves a split every reader rejects as incomplete
    (never a mix of old and new records), and re-running the conversion completes it.
    """
    if not out.exists():
        os.chmod(build, 0o777 & ~io.umask())  # mkdtemp made it 0700
        os.rename(build, out)
        return
    with contextlib.suppress(FileNotFoundError):
        (out / METADATA_FILE).unlink()
    for f in new_files:
        os.replace(build / f, out / f)
    for f in sorted(owned - {METADATA_FILE, *new_files}):  # old shards the new split lacks
        with contextlib.suppress(FileNotFoundError):
            (out / f).unlink()
    os.replace(build / METADATA_FILE, out / METADATA_FILE)


def _record_stream(batches: Iterable[tuple[np.ndarray, np.ndarray]], spec: ImageSpec):
    for images, labels in batches:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != spec.shape:
            raise DataError(
                f"converter produced images {images.dtype}{list(images.shape[1:])}, "
                f"expected uint8{list(spec.shape)}"
            )
        yield from encode_records(images, labels)

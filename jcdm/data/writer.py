"""Writes images as ArrayRecord shards plus `metadata.json` (format: `jcdm.data.records`)."""

from __future__ import annotations

import contextlib
import os
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
    SHARD_SUFFIX,
    WRITER_OPTIONS,
    encode_records,
    sha256_file,
    shard_name,
)
from jcdm.data.spec import DataError, ImageSpec
from jcdm.runtime import io


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


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

    Records keep the order of `batches` and are split into contiguous, near-equal shards. Each
    shard is written under a temporary name and renamed when complete; the metadata file goes
    last. Any previous metadata is removed first, so an interrupted run leaves a directory that
    every reader rejects as incomplete rather than one that looks like a smaller dataset.

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
    out.mkdir(parents=True, exist_ok=True)
    if num_records <= 0:
        raise DataError(f"no records to write into {out}: the input is empty")
    _remove_quietly(out / METADATA_FILE)
    for stale in list(out.glob(f"{split}-*{SHARD_SUFFIX}")) + list(out.glob(".*.partial")):
        stale.unlink()
    num_shards = max(1, min(num_shards, num_records))
    bounds = [k * num_records // num_shards for k in range(num_shards + 1)]
    spec = ImageSpec(*image_shape, num_records)
    shards: list[dict[str, Any]] = []
    stream = _record_stream(batches, spec)
    for k in range(num_shards):
        final = out / shard_name(split, k, num_shards)
        partial = out / f".{final.name}.partial"
        writer = ArrayRecordWriter(str(partial), WRITER_OPTIONS)
        try:
            for _ in range(bounds[k + 1] - bounds[k]):
                record = next(stream, None)
                if record is None:
                    raise DataError(f"the input for {out} ended before {num_records} records")
                writer.write(record)
        finally:
            writer.close()
        io.commit_local_file(partial, final)  # ArrayRecord writes local files only
        shards.append(
            {
                "file": final.name,
                "num_records": int(bounds[k + 1] - bounds[k]),
                "bytes": final.stat().st_size,
                "sha256": sha256_file(final),
            }
        )
    if next(stream, None) is not None:
        raise DataError(f"the input for {out} holds more than the {num_records} records announced")
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
    io.write_json(out / METADATA_FILE, metadata, indent=2)
    return out / METADATA_FILE


def _record_stream(batches: Iterable[tuple[np.ndarray, np.ndarray]], spec: ImageSpec):
    for images, labels in batches:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != spec.shape:
            raise DataError(
                f"converter produced images {images.dtype}{list(images.shape[1:])}, "
                f"expected uint8{list(spec.shape)}"
            )
        yield from encode_records(images, labels)

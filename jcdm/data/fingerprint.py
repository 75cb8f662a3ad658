"""Which dataset a run reads: a fingerprint stored in the checkpointed iterator state.

Two datasets with the same record count and image shape give the same batch shapes, so only
their contents tell them apart. Hashing the records on every start would cost minutes on large
data; the converter already records each shard's SHA-256 in `metadata.json` (and the source
checks the shards against it when opened, up to 2 GiB by default), so the fingerprint is a hash
of the metadata's description of the contents: format, record count, image shape and dtype, and
each shard's record count, size and checksum. It does not change when the dataset is moved or
copied, and it changes when any shard's bytes do.

Generated sources are fingerprinted by what defines them: the generator and its parameters
(synthetic), or the images themselves (digits, small enough to hash).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from jcdm.data.records import ImageRecordSource

FINGERPRINT_VERSION = 1
# Raise when SyntheticSource's images change: checkpoints of the old generator then refuse to
# resume on the new one.
SYNTHETIC_GENERATOR = "blobs-v1"


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def identify(dataset: str, source: Any) -> tuple[str, str]:
    """(fingerprint, a description for people) of the dataset `source` reads.

    Args:
      dataset: the `dataset` string the source was opened from.
      source: what `jcdm.data.sources.open_source(dataset)` returned.
    """
    spec = source.spec
    shape = [spec.height, spec.width, spec.channels]
    if isinstance(source, ImageRecordSource):
        meta = source.metadata
        shards = [
            # Metadata written before shard checksums existed still has sizes and counts.
            [int(s["num_records"]), int(s.get("bytes", -1)), str(s.get("sha256", ""))]
            for s in meta["shards"]
        ]
        described = {
            "kind": "records",
            "format": [meta.get("format"), meta.get("version")],
            "num_records": spec.num_records,
            "shape": shape,
            "dtype": meta.get("dtype"),
            "shards": shards,
        }
        name = meta.get("name") or "dataset"
        where = f"{os.path.abspath(source.directory)} ({name}, {spec.num_records} records"
        where += f" of {shape})"
    elif dataset.startswith("synthetic"):
        described = {
            "kind": "synthetic",
            "generator": SYNTHETIC_GENERATOR,
            "num_records": spec.num_records,
            "shape": shape,
        }
        where = f"{dataset!r} ({spec.num_records} generated images of {shape})"
    else:  # in-memory arrays (digits): hash the images and labels themselves
        images, labels = source.read_batch(np.arange(spec.num_records))
        described = {
            "kind": "arrays",
            "num_records": spec.num_records,
            "shape": shape,
            "images": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
            "labels": hashlib.sha256(np.asarray(labels, "<i4").tobytes()).hexdigest(),
        }
        where = f"{dataset!r} ({spec.num_records} images of {shape})"
    return f"v{FINGERPRINT_VERSION}:{_digest(described)}", where

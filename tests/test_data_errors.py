"""Bad input is refused before training starts, with an error naming the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from jcdm.data import DataError, ImageRecordSource, make_train_iterator, write_image_records
from jcdm.data.records import METADATA_FILE, encode_records, sha256_file


def _write(tmp_path: Path, num_records: int = 12, num_shards: int = 3) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_records, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(num_records) % 3
    out = tmp_path / "data" / "train"
    write_image_records(
        out,
        [(images, labels)],
        num_records=num_records,
        image_shape=(4, 4, 3),
        num_shards=num_shards,
        split="train",
        name="tiny",
    )
    return out


def _open(directory: Path | str, **kwargs) -> None:
    """Opens the dataset the way training does."""
    make_train_iterator(
        dataset=str(directory), global_batch_size=4, seed=0, process_index=0, process_count=1,
        **kwargs,
    )  # fmt: skip


def _edit_metadata(directory: Path, edit) -> None:
    path = directory / METADATA_FILE
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist.*prepare_cifar10\.py"):
        _open(tmp_path / "nowhere")


def test_remote_path_is_explained():
    with pytest.raises(DataError, match="gs://bucket/cifar10: remote paths .*gcsfuse"):
        _open("gs://bucket/cifar10")


def test_missing_shard(tmp_path):
    directory = _write(tmp_path)
    (directory / "train-00001-of-00003.array_record").unlink()
    with pytest.raises(
        DataError, match=r"shard .*train-00001-of-00003\.array_record .* is missing"
    ):
        _open(directory)


def test_truncated_shard(tmp_path):
    directory = _write(tmp_path)
    shard = directory / "train-00002-of-00003.array_record"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(
        DataError, match=r"train-00002-of-00003\.array_record has \d+ bytes .*truncated"
    ):
        _open(directory)


def test_corrupted_shard_fails_its_checksum(tmp_path):
    directory = _write(tmp_path)
    shard = directory / "train-00000-of-00003.array_record"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(
        DataError, match=r"train-00000-of-00003\.array_record does not match the SHA-256"
    ):
        _open(directory)


def test_record_of_the_wrong_size(tmp_path):
    """A shard whose middle record is short, with metadata consistent with the file itself."""
    directory = _write(tmp_path)
    shard = directory / "train-00001-of-00003.array_record"
    records = encode_records(np.zeros((4, 4, 4, 3), np.uint8), np.zeros(4))
    records[2] = records[2][:-5]
    writer = ArrayRecordWriter(str(shard), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()

    def fix(meta):
        meta["shards"][1].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))

    _edit_metadata(directory, fix)
    with pytest.raises(
        DataError, match=r"train-00001-of-00003\.array_record: record 2 has 47 bytes.* 52 bytes"
    ):
        _open(directory)
    # Without verification the open-time check passes; reading the record still names it.
    source = ImageRecordSource(directory, verify_checksums=False)
    with pytest.raises(
        DataError, match=r"train-00001-of-00003\.array_record: record 2 has 47 bytes"
    ):
        source.read_batch(np.array([0, 6]))


def test_metadata_that_does_not_match_the_files(tmp_path):
    directory = _write(tmp_path)

    def recount(meta):
        meta["shards"][0]["num_records"] = 5
        meta["num_records"] = 13

    _edit_metadata(directory, recount)
    with pytest.raises(
        DataError, match=r"train-00000-of-00003\.array_record holds 4 records but .* says 5"
    ):
        _open(directory)
    _edit_metadata(directory, lambda meta: meta.update(num_records=99))
    with pytest.raises(
        DataError, match=rf"{METADATA_FILE}: num_records is 99 but its shards list 13"
    ):
        _open(directory)
    _edit_metadata(directory, lambda meta: meta.update(num_records=13, channels=1))
    with pytest.raises(DataError, match=r"record_bytes 52 do not match uint8 4x4x1"):
        _open(directory)
    (directory / METADATA_FILE).write_text("{ not json")
    with pytest.raises(DataError, match=rf"{METADATA_FILE} is not readable JSON"):
        _open(directory)


def test_shards_without_metadata_are_an_interrupted_conversion(tmp_path):
    directory = _write(tmp_path)
    (directory / METADATA_FILE).unlink()
    with pytest.raises(DataError, match="3 shard file.* no metadata.json.*interrupted"):
        _open(directory)


def test_bad_settings(tmp_path):
    directory = _write(tmp_path)
    with pytest.raises(DataError, match="holds 4x4 images but image_size=8"):
        _open(directory, image_size=8)
    with pytest.raises(DataError, match="synthetic:HxWxC:N"):
        _open("synthetic:4x4:10")
    with pytest.raises(DataError, match="divisible by process_count 3"):
        make_train_iterator(
            dataset="synthetic", global_batch_size=4, seed=0, process_index=0, process_count=3
        )
    with pytest.raises(DataError, match=r"process_index 2 is not in \[0, process_count=2\)"):
        make_train_iterator(
            dataset="synthetic", global_batch_size=4, seed=0, process_index=2, process_count=2
        )
    with pytest.raises(DataError, match="shuffle must be one of"):
        make_train_iterator(
            dataset="synthetic", global_batch_size=4, seed=0, process_index=0, process_count=1,
            shuffle="window",
        )  # fmt: skip

"""Conversion to ArrayRecord shards: CIFAR-10's official archive, image folders, the digits demo."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jcdm.data import (
    DataError,
    ImageRecordSource,
    convert_cifar10,
    convert_digits,
    convert_image_folder,
    load_digits_images,
    make_train_iterator,
)

ROOT = Path(__file__).resolve().parents[1]
LABEL_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


class _Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2's cPickle wrote the CIFAR-10 batches (protocol 2).

    Python 2 `str` (our `bytes`) used the BINSTRING opcodes, and numpy lived in `numpy.core`.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _batch(rng: np.random.Generator, per_class: int, label: str) -> dict:
    labels = [c for c in range(10) for _ in range(per_class)]
    order = rng.permutation(len(labels))
    labels = [labels[i] for i in order]
    data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    names = [f"img_{i}.png".encode() for i in range(len(labels))]
    return {b"batch_label": label.encode(), b"labels": labels, b"data": data, b"filenames": names}


def write_official_archive(path: Path, per_class: int = 1, seed: int = 0) -> dict:
    """A cifar-10-python.tar.gz in the official layout: 5 train batches, test batch, meta."""
    rng = np.random.default_rng(seed)
    batches = {
        f"data_batch_{i}": _batch(rng, per_class, f"training batch {i} of 5") for i in range(1, 6)
    }
    batches["test_batch"] = _batch(rng, per_class, "testing batch 1 of 1")
    meta = {
        b"label_names": [n.encode() for n in LABEL_NAMES],
        b"num_cases_per_batch": 10 * per_class,
        b"num_vis": 3072,
    }
    with tarfile.open(path, "w:gz") as tar:
        members = {
            **{k: _py2_pickle(v) for k, v in batches.items()},
            "batches.meta": _py2_pickle(meta),
        }
        members["readme.html"] = b"<html></html>"
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches


def _expected(batches: dict, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = np.concatenate([batches[n][b"data"] for n in names])
    labels = np.concatenate([batches[n][b"labels"] for n in names])
    # Official rows: 1024 red, 1024 green, 1024 blue values, each plane row-major.
    hwc = np.stack([data[:, :1024], data[:, 1024:2048], data[:, 2048:]], axis=-1)
    return hwc.reshape(-1, 32, 32, 3), labels


def test_official_archive_round_trips_bit_exactly(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    batches = write_official_archive(archive, per_class=3)
    train_dir, test_dir = convert_cifar10(
        archive, tmp_path / "cifar10", num_shards=4, test_shards=2
    )

    for split_dir, names in (
        (train_dir, [f"data_batch_{i}" for i in range(1, 6)]),
        (test_dir, ["test_batch"]),
    ):
        images, labels = _expected(batches, names)
        src = ImageRecordSource(split_dir, verify_checksums=True)
        assert src.spec.shape == (32, 32, 3) and len(src) == len(images)
        assert src.label_names == LABEL_NAMES
        got, got_labels = src.read_batch(np.arange(len(src)))
        np.testing.assert_array_equal(got, images)
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_array_equal(src[7], images[7])
        assert src.label(7) == labels[7]
    meta = ImageRecordSource(train_dir).metadata
    assert meta["num_records"] == 150 and meta["dtype"] == "uint8"
    assert [s["num_records"] for s in meta["shards"]] == [37, 38, 37, 38]
    assert all(len(s["sha256"]) == 64 for s in meta["shards"])
    # The parent directory resolves to its train split.
    assert ImageRecordSource(tmp_path / "cifar10").directory == train_dir

    # The training stream decodes the same pixels: unflipped images are exactly x / 127.5 - 1.
    it = make_train_iterator(
        dataset=str(train_dir), global_batch_size=50, seed=1, process_index=0, process_count=1,
        random_flip=False, with_labels=True, with_record_index=True,
    )  # fmt: skip
    images, labels = _expected(batches, [f"data_batch_{i}" for i in range(1, 6)])
    for _ in range(3):
        batch = next(it)
        idx = batch["record_index"]
        np.testing.assert_array_equal(batch["image"], images[idx].astype(np.float32) / 127.5 - 1)
        np.testing.assert_array_equal(batch["label"], labels[idx])


def test_rerun_keeps_complete_output_and_force_rewrites(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_official_archive(archive)
    out = tmp_path / "out"
    convert_cifar10(archive, out, num_shards=2)
    shard = next((out / "train").glob("*.array_record"))
    before = shard.stat().st_mtime_ns
    convert_cifar10(archive, out, num_shards=2)
    assert shard.stat().st_mtime_ns == before  # up to date: not rewritten
    convert_cifar10(archive, out, num_shards=3)  # other settings: rewritten, old shards gone
    assert sorted(p.name for p in (out / "train").glob("*.array_record")) == [
        f"train-0000{i}-of-00003.array_record" for i in range(3)
    ]
    assert len(ImageRecordSource(out / "train")) == 50


def _write_png(path: Path, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)


def test_image_folder_any_size_with_class_labels(tmp_path):
    for i, (cls, size) in enumerate([("cat", (40, 20)), ("cat", (9, 9)), ("dog", (64, 48))]):
        _write_png(tmp_path / "in" / cls / f"{i}.png", size, 30 * i)
    split = convert_image_folder(tmp_path / "in", tmp_path / "out", image_size=8, num_shards=2)
    src = ImageRecordSource(split)
    assert src.spec.shape == (8, 8, 3) and len(src) == 3
    assert src.label_names == ["cat", "dog"]
    images, labels = src.read_batch(np.arange(3))
    assert labels.tolist() == [0, 0, 1]
    # Flat colours survive cropping and resizing exactly.
    assert images[2, 3, 3].tolist() == [60, 195, 7]


def _digest(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_failed_reconversion_keeps_the_old_split_and_every_user_file(tmp_path, capsys):
    for i in range(70):
        _write_png(tmp_path / "in" / f"{i:02d}.png", (6, 6), i)
    convert_image_folder(tmp_path / "in", tmp_path / "out", image_size=4, num_shards=7)
    split = tmp_path / "out" / "train"
    (split / "train-notes.array_record").write_text("mine")  # a user's file, named like a shard
    (split / "README").write_text("mine too")
    before = _digest(tmp_path / "out")
    (tmp_path / "in" / "69.png").write_bytes(b"not a png")  # the last shard fails to decode
    with pytest.raises(DataError, match=r"69\.png cannot be decoded"):
        convert_image_folder(tmp_path / "in", tmp_path / "out", image_size=4, num_shards=3)
    assert _digest(tmp_path / "out") == before  # byte-identical, no building folder left
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train"]
    assert _cli()(["verify", str(split)]) == 0
    assert "70 records of 4x4x3" in capsys.readouterr().out
    # A successful re-conversion replaces the old shards and keeps the user's files.
    (tmp_path / "in" / "69.png").unlink()
    convert_image_folder(tmp_path / "in", tmp_path / "out", image_size=4, num_shards=3)
    assert sorted(p.name for p in split.iterdir()) == [
        "README",
        "metadata.json",
        *(f"train-0000{i}-of-00003.array_record" for i in range(3)),
        "train-notes.array_record",
    ]
    assert len(ImageRecordSource(split)) == 69
    assert (split / "train-notes.array_record").read_text() == "mine"


def test_a_file_the_converter_did_not_write_is_never_overwritten(tmp_path):
    _write_png(tmp_path / "in" / "a.png", (6, 6), 1)
    split = tmp_path / "out" / "train"
    split.mkdir(parents=True)
    (split / "train-00000-of-00001.array_record").write_text("user data")
    with pytest.raises(DataError, match="which no earlier conversion listed"):
        convert_image_folder(tmp_path / "in", tmp_path / "out", image_size=4, num_shards=1)
    assert (split / "train-00000-of-00001.array_record").read_text() == "user data"
    (split / "train-00000-of-00001.array_record").unlink()
    (split / "metadata.json").write_text("{not json")
    with pytest.raises(DataError, match="not readable as a converted split's metadata"):
        convert_image_folder(tmp_path / "in", tmp_path / "out", image_size=4, num_shards=1)
    assert (split / "metadata.json").read_text() == "{not json"
    # A tampered metadata.json that lists a user's file cannot make the converter delete it.
    (split / "metadata.json").unlink()
    convert_image_folder(tmp_path / "in", tmp_path / "out", image_size=4, num_shards=1)
    (split / "README").write_text("mine")
    meta = json.loads((split / "metadata.json").read_text())
    meta["shards"].append({"file": "README", "num_records": 0, "bytes": 4, "sha256": "0"})
    (split / "metadata.json").write_text(json.dumps(meta))
    convert_image_folder(tmp_path / "in", tmp_path / "out", image_size=4, num_shards=2)
    assert (split / "README").read_text() == "mine"
    assert len(ImageRecordSource(split)) == 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_converted_split_follows_the_umask(tmp_path, umask):
    _write_png(tmp_path / "in" / "a.png", (6, 6), 1)
    old = os.umask(umask)
    try:
        split = convert_image_folder(tmp_path / "in", tmp_path / "out", image_size=4, num_shards=1)
    finally:
        os.umask(old)
    assert split.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in split.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def _save(path: Path, im: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)


def test_every_pil_mode_converts_to_what_a_viewer_shows(tmp_path):
    d = tmp_path / "in"
    wide = np.full((4, 4), 32896, np.uint16)  # 16-bit mid-gray: 32896 * 255 / 65535 = 128
    _save(d / "0_gray16.png", Image.fromarray(wide))
    assert Image.open(d / "0_gray16.png").mode.startswith("I")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    _save(d / "1_palette.png", pal)
    _save(d / "2_rgba_clear.png", Image.new("RGBA", (4, 4), (9, 9, 9, 0)))  # onto white
    _save(d / "3_la_half.png", Image.new("LA", (4, 4), (0, 128)))  # black, half opaque
    _save(d / "4_cmyk.jpg", Image.new("CMYK", (4, 4), (0, 0, 0, 0)), quality=100)  # white
    _save(d / "5_bilevel.png", Image.new("1", (4, 4), 1))
    _save(d / "6_rgb.png", Image.new("RGB", (4, 4), (1, 2, 3)))
    split = convert_image_folder(d, tmp_path / "out", image_size=2, num_shards=1)
    images, _ = ImageRecordSource(split).read_batch(np.arange(7))
    px = images[:, 0, 0].tolist()
    assert px[0] == [128, 128, 128]
    assert px[1] == [10, 200, 30]
    assert px[2] == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in px[3])
    assert all(v >= 254 for v in px[4])
    assert px[5] == [255, 255, 255]
    assert px[6] == [1, 2, 3]
    gray = convert_image_folder(d, tmp_path / "gray", image_size=2, channels=1, num_shards=1)
    assert ImageRecordSource(gray).read_batch(np.arange(1))[0][0, 0, 0, 0] == 128


def test_float_images_and_huge_sizes_are_refused_with_the_fix(tmp_path, capsys):
    _save(tmp_path / "f" / "x.tif", Image.fromarray(np.full((4, 4), 0.5, np.float32)))
    with pytest.raises(DataError, match="pixel mode 'F'.*save it as 8-bit"):
        convert_image_folder(tmp_path / "f", tmp_path / "out", image_size=2, num_shards=1)
    _write_png(tmp_path / "in" / "a.png", (6, 6), 1)
    main = _cli()
    argv = ["folder", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--image-size", "100000"]) == 2
    assert "image size 100000 is outside 1..1024" in capsys.readouterr().err
    assert main([*argv, "--image-size", "0"]) == 2
    assert main([*argv, "--image-size", "4", "--shards", "-3"]) == 2
    assert "number of shards must be an integer >= 1 (--shards), got -3" in capsys.readouterr().err
    assert main([*argv, "--image-size", "4", "--split", "../up"]) == 2
    assert "split name '../up'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_digits_directory_matches_in_memory_digits(tmp_path):
    split = convert_digits(tmp_path / "digits", image_size=16, num_shards=3)
    images, labels = load_digits_images(16)
    src = ImageRecordSource(split)
    assert src.spec.shape == (16, 16, 1) and len(src) == 1797
    got, got_labels = src.read_batch(np.arange(0, 1797, 100))
    np.testing.assert_array_equal(got, images[::100])
    np.testing.assert_array_equal(got_labels, labels[::100])
    kwargs = dict(global_batch_size=32, seed=5, process_index=0, process_count=1)
    from_dir = make_train_iterator(dataset=str(split), **kwargs)
    in_memory = make_train_iterator(dataset="digits", **kwargs)
    for _ in range(2):
        np.testing.assert_array_equal(next(from_dir)["image"], next(in_memory)["image"])


def _cli():
    spec = importlib.util.spec_from_file_location(
        "prepare_cifar10", ROOT / "tools" / "prepare_cifar10.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_converts_and_reports_bad_input(tmp_path, capsys):
    main = _cli()
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_official_archive(archive)
    assert (
        main(["cifar10", "--archive", str(archive), "--out", str(tmp_path / "c"), "--shards", "2"])
        == 0
    )
    assert (
        "50 records of 32x32x3 uint8 in 2 shards, 10 labels, checksums OK"
        in capsys.readouterr().out
    )
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_bad_archives_are_rejected_with_the_reason(tmp_path):
    with pytest.raises(DataError, match="does not exist. Download"):
        convert_cifar10(tmp_path / "nope.tar.gz", tmp_path / "out")
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="lacks .*data_batch_2"):
        convert_cifar10(partial, tmp_path / "out")
    # A pickle that would run code is refused, not executed.
    evil = tmp_path / "evil.tar.gz"
    write_official_archive(evil)
    with tarfile.open(evil, "r:gz") as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    blobs["cifar-10-batches-py/data_batch_3"] = b"cos\nsystem\n(S'echo pwned'\ntR."
    with tarfile.open(evil, "w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(
        DataError, match=r"data_batch_3 is not a CIFAR-10 python batch .*os\.system"
    ):
        convert_cifar10(evil, tmp_path / "out")

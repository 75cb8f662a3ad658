"""Converters into ArrayRecord shards: the CIFAR-10 python archive, a folder of images, the digits.

Each converter writes `<out>/<split>/` via `write_image_records` and is safe to re-run: when the
split's metadata already describes the same input and settings and its shards verify, it is kept
as is; otherwise a new split is built and verified beside it and only then replaces it, so a
failed run leaves the old split readable, and no file the converter did not write is touched.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jcdm.data.records import METADATA_FILE, ImageRecordSource, sha256_file
from jcdm.data.sources import load_digits_images
from jcdm.data.spec import DataError
from jcdm.data.writer import write_image_records

log = logging.getLogger(__name__)

CIFAR_TRAIN_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_MEMBERS = ("test_batch",)
CIFAR_META_MEMBER = "batches.meta"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_FOLDER_CHUNK = 64  # images decoded at a time: bounds memory for large folders
# Largest square side the converters write: a 1024x1024 RGB record is 3 MiB and a chunk of 64 of
# them 192 MiB; a larger size is a typo far more often than a dataset (docs/operations.md).
MAX_IMAGE_SIZE = 1024

# The CIFAR-10 batches are Python 2 pickles of dicts holding a numpy array. Only the globals
# needed to rebuild such arrays are allowed, so a tampered archive cannot run code.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refers to {module}.{name}, which a CIFAR batch never does"
            )
        if module.startswith("numpy") and "multiarray" in module:
            try:  # numpy >= 2 moved numpy.core to numpy._core
                from numpy._core import multiarray
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core import multiarray
            return getattr(multiarray, name)
        return super().find_class(module, name)


def _load_batch(archive: Path, member: str, data: bytes) -> dict[str, Any]:
    try:
        # encoding="bytes": the batches were pickled by Python 2, whose str holds raw bytes.
        raw = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise DataError(
            f"{archive}: member {member} is not a CIFAR-10 python batch ({e}). Download "
            "cifar-10-python.tar.gz again from https://www.cs.toronto.edu/~kriz/cifar.html"
        ) from e
    if not isinstance(raw, dict):
        raise DataError(f"{archive}: member {member} holds a {type(raw).__name__}, not a dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def read_cifar10_archive(archive: str | os.PathLike) -> dict[str, Any]:
    """Reads the official `cifar-10-python.tar.gz`.

    Returns:
      {"train": (uint8 [N, 32, 32, 3], int32 [N]), "test": (...), "label_names": [str]}, with
      the train batches in order 1..5 and images converted from the stored CHW rows to HWC.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(
            f"CIFAR-10 archive {archive} does not exist. Download cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and pass its path with --archive."
        )
    members: dict[str, bytes] = {}
    wanted = {*CIFAR_TRAIN_MEMBERS, *CIFAR_TEST_MEMBERS, CIFAR_META_MEMBER}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                base = info.name.rsplit("/", 1)[-1]
                if info.isfile() and base in wanted:
                    members[base] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive} is not a readable tar archive ({e}); download it again") from e
    missing = sorted(wanted - members.keys())
    if missing:
        raise DataError(
            f"{archive} lacks {missing}: it is not the CIFAR-10 *python* version "
            "(cifar-10-python.tar.gz)"
        )
    meta = _load_batch(archive, CIFAR_META_MEMBER, members[CIFAR_META_MEMBER])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if len(names) != 10:
        raise DataError(f"{archive}: {CIFAR_META_MEMBER} lists {len(names)} label names, not 10")
    out: dict[str, Any] = {"label_names": names}
    for split, batch_names in (("train", CIFAR_TRAIN_MEMBERS), ("test", CIFAR_TEST_MEMBERS)):
        images, labels = [], []
        for member in batch_names:
            batch = _load_batch(archive, member, members[member])
            data = np.asarray(batch.get("data"))
            lab = np.asarray(batch.get("labels"), np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(
                    f"{archive}: {member} data is {data.dtype}{data.shape}, not uint8 [n, 3072]"
                )
            if lab.shape != (data.shape[0],) or lab.min(initial=0) < 0 or lab.max(initial=0) > 9:
                raise DataError(
                    f"{archive}: {member} labels do not match its {data.shape[0]} images"
                )
            # Each row stores the red plane, then green, then blue (CHW); the pipeline wants HWC.
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(lab.astype(np.int32))
        out[split] = (np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
    return out


def _up_to_date(split_dir: Path, source: dict[str, Any]) -> bool:
    """True when `split_dir` was converted from `source` with these settings and still verifies."""
    if not (split_dir / METADATA_FILE).exists():
        return False
    try:
        current = ImageRecordSource(split_dir, verify_checksums=True)
    except DataError as e:
        log.info("rewriting %s: %s", split_dir, e)
        return False
    return current.metadata.get("source") == source


def _chunks(images: np.ndarray, labels: np.ndarray, size: int = 4096) -> Iterator[tuple]:
    for start in range(0, len(images), size):
        yield images[start : start + size], labels[start : start + size]


def convert_cifar10(
    archive: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_shards: int = 8,
    test_shards: int = 2,
    force: bool = False,
) -> list[Path]:
    """Converts `cifar-10-python.tar.gz` into `<out_dir>/train` and `<out_dir>/test`.

    Returns:
      The two split directories.
    """
    archive = Path(archive)
    out = Path(out_dir)
    fingerprint = sha256_file(archive) if archive.is_file() else ""
    data = None
    written = []
    for split, shards in (("train", num_shards), ("test", test_shards)):
        source = {"kind": "cifar10", "archive_sha256": fingerprint, "num_shards": shards}
        if not force and _up_to_date(out / split, source):
            log.info("%s is up to date; pass force=True (--force) to rewrite it", out / split)
        else:
            data = data or read_cifar10_archive(archive)
            images, labels = data[split]
            write_image_records(
                out / split,
                _chunks(images, labels),
                num_records=len(images),
                image_shape=images.shape[1:],
                num_shards=shards,
                split=split,
                name="cifar10",
                label_names=data["label_names"],
                source=source,
            )
        written.append(out / split)
    return written


def _list_images(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise DataError(f"image folder {folder} holds no images with suffixes {IMAGE_SUFFIXES}")
    tops = [p.relative_to(folder).parts for p in files]
    if all(len(parts) > 1 for parts in tops):  # class-per-subdirectory layout
        classes = sorted({parts[0] for parts in tops})
        index = {c: i for i, c in enumerate(classes)}
        return files, [index[parts[0]] for parts in tops], classes
    return files, [-1] * len(files), []


def _load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = _to_8bit(ImageOps.exif_transpose(im), path)
            im = im.convert("RGB" if channels == 3 else "L")
            # Centre-crop to a square, then resize: no distortion of the aspect ratio.
            im = ImageOps.fit(im, (image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(im, np.uint8).reshape(image_size, image_size, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} cannot be decoded ({e}); delete or replace it") from e


_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale (Pillow's "I" for PNG)


def _to_8bit(im, path: Path):
    """`im` as an 8-bit "L" or "RGB" image with its look kept; every other case is refused.

    16-bit grayscale is scaled from 0..65535 to 0..255 (PIL's own conversion clips, turning it
    white); transparency is composited onto white, as a viewer shows it; palette, 1-bit, CMYK
    and YCbCr images convert through PIL. Float and wider integer images are refused: their
    range is unknown, so any scaling would be a guess.
    """
    from PIL import Image

    if im.mode in _WIDE_GRAY:
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(
                f"image {path} is {im.mode} with values in [{a.min()}, {a.max()}], not 16-bit "
                "grayscale; convert it to an 8-bit or 16-bit image first"
            )
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    if im.mode in ("L", "RGB"):
        return im
    if im.mode in ("1", "CMYK", "YCbCr"):
        return im.convert("RGB" if im.mode != "1" else "L")
    if im.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    raise DataError(
        f"image {path} has pixel mode {im.mode!r}, which the converter does not scale "
        "(float or wide integer data has no known range); save it as 8-bit or 16-bit "
        "grayscale, RGB or RGBA"
    )


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise DataError(f"image size must be an integer, got {image_size!r}")
    if not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise DataError(
            f"image size {image_size} is outside 1..{MAX_IMAGE_SIZE} (--image-size, the side of "
            "the square images written); e.g. --image-size 32"
        )


def convert_image_folder(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: int,
    channels: int = 3,
    num_shards: int = 8,
    split: str = "train",
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Converts every image under `folder` (any size, centre-cropped and resized) to shards.

    Images directly in class subdirectories (`folder/<class>/<image>`) get the class index as
    label; otherwise labels are -1. Files are taken in sorted path order.

    Returns:
      The split directory `<out_dir>/<split>`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a directory")
    if channels not in (1, 3):
        raise DataError(f"need channels 1 or 3, got {channels}")
    _check_image_size(image_size)
    files, labels, classes = _list_images(folder)
    listing = hashlib.sha256()
    for path in files:
        listing.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\n".encode())
    source = {
        "kind": "image_folder",
        "folder": str(folder.resolve()),
        "listing_sha256": listing.hexdigest(),
        "image_size": image_size,
        "channels": channels,
        "num_shards": num_shards,
    }
    split_dir = Path(out_dir) / split
    if not force and _up_to_date(split_dir, source):
        log.info("%s is up to date; pass force=True (--force) to rewrite it", split_dir)
        return split_dir

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(files), _FOLDER_CHUNK):
            chunk = files[start : start + _FOLDER_CHUNK]
            images = np.stack([_load_image(p, image_size, channels) for p in chunk])
            yield images, np.asarray(labels[start : start + _FOLDER_CHUNK], np.int32)

    write_image_records(
        split_dir,
        batches(),
        num_records=len(files),
        image_shape=(image_size, image_size, channels),
        num_shards=num_shards,
        split=split,
        name=name or folder.name,
        label_names=classes,
        source=source,
    )
    return split_dir


def convert_digits(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 16,
    num_shards: int = 2,
    force: bool = False,
) -> Path:
    """Writes the demo dataset (scikit-learn's 1,797 digits, `image_size`) to `<out_dir>/train`."""
    import sklearn

    _check_image_size(image_size)
    images, labels = load_digits_images(image_size)
    source = {
        "kind": "digits",
        "sklearn": sklearn.__version__,
        "image_size": image_size,
        "num_shards": num_shards,
    }
    split_dir = Path(out_dir) / "train"
    if force or not _up_to_date(split_dir, source):
        write_image_records(
            split_dir,
            [(images, labels)],
            num_records=len(images),
            image_shape=images.shape[1:],
            num_shards=num_shards,
            split="train",
            name="digits",
            label_names=[str(d) for d in range(10)],
            source=source,
        )
    return split_dir


def describe(split_dir: str | os.PathLike) -> str:
    """One line about a converted split, after full verification (checksums included)."""
    src = ImageRecordSource(split_dir, verify_checksums=True)
    s = src.spec
    shards: Sequence[Any] = src.metadata["shards"]
    return (
        f"{src.directory}: {s.num_records} records of {s.height}x{s.width}x{s.channels} uint8 "
        f"in {len(shards)} shards, {len(src.label_names)} labels, checksums OK"
    )

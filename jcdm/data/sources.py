"""Image sources behind a `dataset` string: generated blobs, scikit-learn digits, or shards on disk.

Every source offers `spec`, `__len__` and `read_batch(indices) -> (uint8 [k,H,W,C], int32 [k])`,
which is all the pipeline needs. Sources are pickled into Grain's worker processes, so they hold
only plain data (or, for ArrayRecord, paths that reopen lazily).
"""

from __future__ import annotations

import functools
import re

import numpy as np

from jcdm.data.records import ImageRecordSource
from jcdm.data.spec import DataError, ImageSpec

DEFAULT_SMALL_IMAGE_SIZE = 16
DEFAULT_SYNTHETIC_RECORDS = 512
DIGITS_RECORDS = 1797
_SYNTHETIC_BLOBS = 3
_SYNTHETIC_RE = re.compile(r"synthetic(?::(\d+)x(\d+)x(\d+))?(?::(\d+))?")


def mix64(values: np.ndarray, key: int) -> np.ndarray:
    """A keyed 64-bit hash of each value (splitmix64 finaliser), vectorised.

    Used wherever randomness must be a pure function of (seed, index), independent of which
    process or worker asks: per-position flips and per-record synthetic images.
    """
    x = np.asarray(values).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _uniform(values: np.ndarray, key: int) -> np.ndarray:
    """Uniform floats in [0, 1) that depend only on (value, key)."""
    return (mix64(values, key) >> np.uint64(11)).astype(np.float64) * 2.0**-53


class SyntheticSource:
    """Deterministic smooth images: a few coloured Gaussian blobs per record, unlabeled (-1).

    Record `i` is a pure function of `i`, so any subset is generated on demand without storing
    the dataset, identically in every process.
    """

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec
        self.label_names: list[str] = []

    def __len__(self) -> int:
        return self.spec.num_records

    def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Generates records `indices`: (uint8 images [k, H, W, C], labels of -1)."""
        idx = np.asarray(indices, np.int64)
        h, w, c = self.spec.shape
        n_params = 3 + c  # centre y, centre x, width, colour per channel
        keys = idx[:, None] * (_SYNTHETIC_BLOBS * n_params) + np.arange(_SYNTHETIC_BLOBS * n_params)
        params = _uniform(keys, 0x5EED).astype(np.float32)
        params = params.reshape(len(idx), _SYNTHETIC_BLOBS, n_params)
        yy = ((np.arange(h) + 0.5) / h).astype(np.float32)
        xx = ((np.arange(w) + 0.5) / w).astype(np.float32)
        cy, cx = params[..., 0, None, None], params[..., 1, None, None]
        width = 0.08 + 0.25 * params[..., 2, None, None]
        dist2 = (yy[:, None] - cy) ** 2 + (xx[None, :] - cx) ** 2  # [k, blobs, h, w]
        weight = np.exp(-dist2 / (2 * width**2))
        colour = params[..., 3:]  # [k, blobs, c]
        image = np.einsum("kbhw,kbc->khwc", weight, colour)
        image = np.clip(image * np.float32(255), 0, 255)
        return np.round(image).astype(np.uint8), np.full(len(idx), -1, np.int32)


@functools.lru_cache(maxsize=4)
def load_digits_images(image_size: int = DEFAULT_SMALL_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images, offline) as uint8 [N, S, S, 1] and labels.

    Pixel values 0..16 are rescaled to 0..255 and resized to `image_size` with bicubic filtering.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    if image_size != raw.shape[1]:
        size = (image_size, image_size)
        raw = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC)) for im in raw])
    images = raw[..., None]
    images.setflags(write=False)
    return images, digits.target.astype(np.int32)


class ArraySource:
    """In-memory images (the digits demo): plain arrays, cheap to pickle into workers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, label_names: list[str]) -> None:
        self.spec = ImageSpec(*images.shape[1:], num_records=images.shape[0])
        self.label_names = label_names
        self._images = images
        self._labels = labels

    def __len__(self) -> int:
        return self.spec.num_records

    def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Records `indices`: (uint8 images [k, H, W, C], int32 labels [k])."""
        return self._images[indices], self._labels[indices]


def _check_size(dataset: str, image_size: int | None, stored: tuple[int, int]) -> None:
    if image_size is not None and (image_size, image_size) != stored:
        raise DataError(
            f"dataset {dataset!r} holds {stored[0]}x{stored[1]} images but image_size="
            f"{image_size} was requested. Leave image_size unset, or convert the data at that "
            "size (tools/prepare_cifar10.py --image-size)."
        )


def open_source(
    dataset: str, *, image_size: int | None = None, verify_checksums: bool | None = False
) -> SyntheticSource | ArraySource | ImageRecordSource:
    """Opens and validates the images a `dataset` string names.

    Args:
      dataset: "synthetic" or "synthetic:HxWxC:N" (generated blobs; default
        `image_size`x`image_size`x3, 512 records), "digits" (scikit-learn's 8x8 digits resized
        to `image_size`, 1 channel), or a directory written by `tools/prepare_cifar10.py`.
      image_size: square size for synthetic/digits (default 16); for directories it must match
        the stored size or be None.
      verify_checksums: for directories, hash every shard (None: only if up to 2 GiB).

    Raises:
      DataError: the string, the size, or the files are wrong; the message says which and why.
    """
    if image_size is not None and image_size <= 0:
        raise DataError(f"image_size must be positive, got {image_size}")
    if dataset.startswith("synthetic"):
        match = _SYNTHETIC_RE.fullmatch(dataset)
        if match is None:
            raise DataError(
                f"dataset {dataset!r}: write 'synthetic', 'synthetic:HxWxC' or "
                "'synthetic:HxWxC:N' (for example 'synthetic:16x16x3:256')"
            )
        h, w, c, n = match.groups()
        size = image_size or DEFAULT_SMALL_IMAGE_SIZE
        h, w = (int(h), int(w)) if h else (size, size)
        _check_size(dataset, image_size, (h, w))
        spec = ImageSpec(h, w, int(c) if c else 3, int(n) if n else DEFAULT_SYNTHETIC_RECORDS)
        if min(spec.height, spec.width, spec.num_records) <= 0 or spec.channels not in (1, 3):
            raise DataError(f"dataset {dataset!r}: sizes must be positive and channels 1 or 3")
        return SyntheticSource(spec)
    if dataset == "digits":
        images, labels = load_digits_images(image_size or DEFAULT_SMALL_IMAGE_SIZE)
        return ArraySource(images, labels, [str(d) for d in range(10)])
    source = ImageRecordSource(dataset, verify_checksums=verify_checksums)
    _check_size(dataset, image_size, (source.spec.height, source.spec.width))
    return source


def dataset_spec(dataset: str, *, image_size: int | None = None) -> ImageSpec:
    """The `ImageSpec` of the images `make_train_iterator(dataset=..., image_size=...)` yields.

    Cheap: directories are validated without hashing their shards.
    """
    return open_source(dataset, image_size=image_size, verify_checksums=False).spec

"""Inception feature statistics (mu, sigma) of a dataset or a sample file, for FID.

    # reference statistics of the CIFAR-10 train split (converted with tools/prepare_cifar10.py)
    python tools/fid_stats.py data/cifar10 --split train --out stats/cifar10_train.npz

    # statistics of a sample file (key `images`, uint8 NHWC), and its FID against a reference
    python tools/fid_stats.py --npz samples.npz --out samples_stats.npz \\
        --ref stats/cifar10_train.npz

Runs on every local device (batch sharded over a ("data", "fsdp") mesh). Weights come from
`--inception_weights`, else $JCDM_INCEPTION_WEIGHTS, else ~/.cache/jcdm/inception_fid.npz (create
them with tools/convert_inception_weights.py). Exits with 2 on bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

USAGE = 2  # == jcdm.exit_codes.USAGE


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_rgb(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{where}: images must be uint8 NHWC with 1 or 3 channels; got {images.shape}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 in [0, 255]; got {images.dtype}")
    # Grayscale data is scored the usual way: the same plane in R, G and B.
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _padded_batches(
    read, total: int, batch_size: int, where: str
) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 batch, valid rows): the last batch is padded to `batch_size` so it reuses the
    executable compiled for the full batches."""
    report_every = max(1, total // batch_size // 10)
    for step, start in enumerate(range(0, total, batch_size)):
        n = min(batch_size, total - start)
        if step and step % report_every == 0:
            print(f"  {start}/{total} images", flush=True)
        images = _to_rgb(np.asarray(read(start, start + n)), where)
        if n < batch_size:
            images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
        yield images, n


def _open_source(args) -> tuple[object, int, str]:
    """(read(lo, hi) -> uint8 images, number of images, description)."""
    if args.npz is not None:
        with np.load(args.npz, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ValueError(f"{args.npz} has no `images` array (keys: {z.files})")
            images = z["images"]
        _to_rgb(images[:1], str(args.npz))
        return (lambda lo, hi: images[lo:hi]), len(images), str(args.npz)
    from jcdm.data import ImageRecordSource

    source = ImageRecordSource(args.data_dir, split=args.split)
    if hasattr(source, "read_batch"):
        read = lambda lo, hi: source.read_batch(np.arange(lo, hi))[0]  # noqa: E731
    else:
        read = lambda lo, hi: np.stack([source[i] for i in range(lo, hi)])  # noqa: E731
    return read, len(source), f"{args.data_dir} ({args.split})"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", nargs="?", type=Path, help="converted ArrayRecord dataset")
    parser.add_argument("--split", default="train", help="split of DATA_DIR (default: train)")
    parser.add_argument("--npz", type=Path, help="score this .npz (key `images`, uint8 NHWC)")
    parser.add_argument(
        "--out", required=True, help="statistics .npz to write (a local path or a bucket URL)"
    )
    parser.add_argument("--batch_size", type=int, default=250, help="global images per step")
    parser.add_argument("--max_images", type=int, default=None, help="use only the first N")
    parser.add_argument("--inception_weights", type=Path, default=None)
    parser.add_argument("--ref", default=None, help="also print FID against these (path or URL)")
    args = parser.parse_args(argv)
    if (args.data_dir is None) == (args.npz is None):
        parser.error("give exactly one of DATA_DIR or --npz")
    if args.batch_size < 1:
        parser.error("--batch_size must be positive")
    from jcdm.runtime import io

    for url in (args.out, args.ref):
        if url is not None and (message := io.missing_bucket_client(url)):
            parser.error(message)  # exit 2

    import jax
    from jax.sharding import Mesh

    from jcdm.fid import fid, inception

    try:
        read, total, description = _open_source(args)
        if args.max_images is not None:
            total = min(total, args.max_images)
        if total < 2:
            raise ValueError(f"{description}: need at least 2 images, found {total}")
        weights = args.inception_weights or inception.default_weights_path()
        params = inception.load_params(weights)
        ref = fid.load_stats(args.ref) if args.ref is not None else None
    except (OSError, ValueError) as e:  # bad input (DataError is a ValueError): exit USAGE
        print(f"error: {e}", file=sys.stderr)
        return USAGE

    devices = jax.devices()
    mesh = Mesh(np.asarray(devices).reshape(len(devices), 1), ("data", "fsdp"))
    fn = fid.make_inception_fn(params, mesh)
    batch_size = min(args.batch_size, total)
    print(f"{description}: {total} images, batch {batch_size}, {len(devices)} device(s)")
    t0 = time.perf_counter()
    stats = fid.accumulate(fn, _padded_batches(read, total, batch_size, description))
    seconds = time.perf_counter() - t0
    mu, sigma = stats.mean_cov()
    fid.save_stats(
        args.out,
        mu,
        sigma,
        count=stats.count,
        source=description,
        protocol=inception.PROTOCOL,
        inception_weights_sha256=_sha256(Path(weights).expanduser()),
    )
    print(f"wrote {args.out}: {stats.count} images in {seconds:.1f}s")
    if ref is not None:
        print(f"FID vs {args.ref}: {fid.frechet_distance(mu, sigma, *ref):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Convert image datasets into the ArrayRecord shards jcdm trains on.

Examples::

    # The official CIFAR-10 python archive -> data/cifar10/{train,test}
    python tools/prepare_cifar10.py cifar10 --archive cifar-10-python.tar.gz --out data/cifar10
    # Any folder of images (class subfolders give labels), centre-cropped and resized
    python tools/prepare_cifar10.py folder --input ~/pictures --out data/pictures --image-size 32
    # The offline demo dataset (scikit-learn's digits)
    python tools/prepare_cifar10.py digits --out data/digits --image-size 16
    # Check a converted split (sizes, record counts, checksums)
    python tools/prepare_cifar10.py verify data/cifar10/train

Train with `make_train_iterator.dataset = "data/cifar10/train"`. Re-running a conversion is safe:
an up-to-date split is kept; a new one is built and verified in a hidden sibling folder and only
then replaces the old one, so a failed run (a corrupt image, a full disk) leaves the old split
passing `verify`. Files in the output folder that the converter did not write are never touched.
Images of any PIL mode are converted as a viewer shows them (16-bit grayscale scaled to 8 bits,
transparency over white) or refused (float images); --image-size is at most 1024.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import jcdm.data as jdata
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jcdm.data as jdata

from jcdm.data.convert import describe
from jcdm.exit_codes import USAGE
from jcdm.runtime import io


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    cifar = sub.add_parser("cifar10", help="convert the official cifar-10-python.tar.gz")
    cifar.add_argument("--archive", required=True, type=Path, help="cifar-10-python.tar.gz")
    cifar.add_argument(
        "--out", required=True, type=io.local_path_arg, help="output root (train/, test/)"
    )
    cifar.add_argument("--shards", type=int, default=8, help="train shards (default 8)")
    cifar.add_argument("--test-shards", type=int, default=2, help="test shards (default 2)")

    folder = sub.add_parser("folder", help="convert a folder of images of any size")
    folder.add_argument("--input", required=True, type=Path, help="folder searched recursively")
    folder.add_argument("--out", required=True, type=io.local_path_arg, help="output root")
    folder.add_argument(
        "--image-size", required=True, type=int, help="square output size (1..1024)"
    )
    folder.add_argument("--channels", type=int, choices=(1, 3), default=3)
    folder.add_argument("--shards", type=int, default=8)
    folder.add_argument("--split", default="train", help="split name (default train)")
    folder.add_argument("--name", default=None, help="dataset name (default: folder name)")

    digits = sub.add_parser("digits", help="write scikit-learn's digits (the offline demo)")
    digits.add_argument("--out", required=True, type=io.local_path_arg, help="output root")
    digits.add_argument("--image-size", type=int, default=16, help="1..1024 (default 16)")
    digits.add_argument("--shards", type=int, default=2)

    for p in (cifar, folder, digits):
        p.add_argument("--force", action="store_true", help="rewrite even if up to date")

    verify = sub.add_parser("verify", help="validate a converted split, checksums included")
    verify.add_argument("split_dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "cifar10":
            dirs = jdata.convert_cifar10(
                args.archive,
                args.out,
                num_shards=args.shards,
                test_shards=args.test_shards,
                force=args.force,
            )
        elif args.command == "folder":
            dirs = [
                jdata.convert_image_folder(
                    args.input,
                    args.out,
                    image_size=args.image_size,
                    channels=args.channels,
                    num_shards=args.shards,
                    split=args.split,
                    name=args.name,
                    force=args.force,
                )
            ]
        elif args.command == "digits":
            dirs = [
                jdata.convert_digits(
                    args.out, image_size=args.image_size, num_shards=args.shards, force=args.force
                )
            ]
        else:
            dirs = [args.split_dir]
        for d in dirs:
            print(describe(d))
    except jdata.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())

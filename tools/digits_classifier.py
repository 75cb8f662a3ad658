#!/usr/bin/env python
"""Train the digits feature network (jcdm/fid/digits.py) and cache it; print held-out accuracy.

    python tools/digits_classifier.py [--out PATH] [--seed 0] [--epochs 30]

Deterministic (fixed split, seed, batch order and augmentation; XLA:CPU). The default PATH is
where `FIDConfig.features = 'digits'` looks: $JCDM_DIGITS_WEIGHTS or ~/.cache/jcdm/digits_cnn.npz.
The trainer creates the same file on first use if it is missing; this command makes it ahead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jcdm.fid import digits  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args()
    out = Path(args.out) if args.out else digits.default_weights_path()
    t0 = time.perf_counter()
    params, acc = digits.train_classifier(seed=args.seed, epochs=args.epochs)
    digits.save_params(params, out, acc)
    print(
        f"digits classifier: held-out accuracy {acc:.4f} ({len(digits.split()[3])} images), "
        f"trained in {time.perf_counter() - t0:.1f}s, written to {out}"
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The cost of a full run projected from measured train steps (jcdm.dev.costs).

    python bench/cost.py bench/results/step_h200_bf16_separable.json [--dtype bfloat16]
        [--steps 400000] [--batch 1024] [--at 0.5]

Reads a bench/step.py JSON, takes each method's best datasheet utilisation among its CIFAR rows
at --dtype, and prints hours and chip-hours on a TPU v4-8, a v5p-8 and 8 H200s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jcdm.dev import costs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("step_json")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=400_000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--at", type=float, nargs="*", default=[], help="also at these utilisations")
    args = p.parse_args()
    result = json.loads(Path(args.step_json).read_text())
    kind = result["machine"]["device_kind"]
    try:
        flops, util, chosen = costs.from_step_rows(result["steps"], kind, args.dtype)
    except ValueError as e:
        raise SystemExit(f"{args.step_json}: {e}") from None
    print(f"measured on {kind} ({args.step_json}):")
    for m in flops:
        print(f"  {m:8s} {flops[m] / 1e9:7.1f} GFLOP/image  {util[m]:6.1%} of peak  ({chosen[m]})")
    rows = costs.cost_table(flops, util, dtype=args.dtype, steps=args.steps, batch=args.batch)
    print(costs.format_table(rows, steps=args.steps, batch=args.batch))
    for u in args.at:
        rows = costs.cost_table(flops, dict.fromkeys(flops, u), dtype=args.dtype)
        print(f"\nthe same at {u:.0%} of peak:\n" + costs.format_table(rows))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Images per second of the input pipeline, and its ratio to what the train step consumes.

    PYTHONPATH=. python bench/data_throughput.py                    # CIFAR-shaped shards, generated
    PYTHONPATH=. python bench/data_throughput.py --data data/cifar10/train --workers 0 2 8

Without `--data` it writes 50,000 CIFAR-shaped (32x32x3) smooth synthetic images as 8 ArrayRecord
shards to a temporary directory, so the reading, decoding and shuffling cost is that of CIFAR-10.
For each worker count it times `--batches` per-process batches of `--batch` images after one
warm-up batch (which absorbs worker start-up). Then, if the trainer offers it, it times the train
step of each config in `--configs` on this machine and prints pipeline / train-step ratios; the
target is a ratio above 10 (the pipeline is never the bottleneck).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jcdm.data import make_train_iterator, write_image_records  # noqa: E402
from jcdm.data.sources import SyntheticSource  # noqa: E402
from jcdm.data.spec import ImageSpec  # noqa: E402


def write_cifar_shaped(out_dir: Path, num_records: int = 50_000, num_shards: int = 8) -> Path:
    """Writes CIFAR-shaped smooth synthetic images (compressible like photos) as shards."""
    source = SyntheticSource(ImageSpec(32, 32, 3, num_records))

    def batches():
        for start in range(0, num_records, 5000):
            idx = np.arange(start, min(start + 5000, num_records))
            yield source.read_batch(idx)

    write_image_records(
        out_dir,
        batches(),
        num_records=num_records,
        image_shape=(32, 32, 3),
        num_shards=num_shards,
        split="train",
        name="cifar-shaped-synthetic",
    )
    return out_dir


def pipeline_images_per_second(
    dataset: str, *, workers: int, batch: int, batches: int, process_count: int
) -> float:
    """Per-process images/s of `make_train_iterator` after a warm-up batch."""
    it = make_train_iterator(
        dataset=dataset,
        global_batch_size=batch * process_count,
        seed=0,
        process_index=0,
        process_count=process_count,
        worker_count=workers,
    )
    try:
        next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batch * batches / (time.perf_counter() - start)
    finally:
        it.close()


def train_step_images_per_second(config: str, train_batch: int, steps: int) -> float:
    """Images/s the compiled train step of `config` consumes on this machine (bench/step.py's
    measurement: the trainer's own update on one fixed batch)."""
    from jcdm.dev import benchmark

    bindings = [f"train.global_batch_size={train_batch}"] if train_batch else []
    benchmark.configure([config], bindings)
    return benchmark.time_train_step(config, calls=steps, rounds=1).images_per_sec


def main() -> None:
    """Parses arguments, runs the measurements and prints a table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", default=None, help="split directory (default: generate one)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=128, help="per-process batch (default 128)")
    parser.add_argument("--batches", type=int, default=200, help="timed batches per run")
    parser.add_argument("--process-count", type=int, default=1, help="simulated processes")
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs per worker count")
    parser.add_argument("--configs", nargs="*", default=["gin/smoke.gin", "gin/joint.gin"])
    parser.add_argument("--train-batch", type=int, default=0, help="override train batch (0: keep)")
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="jcdm-bench-") as tmp:
        data = args.data
        if data is None:
            start = time.perf_counter()
            data = str(write_cifar_shaped(Path(tmp) / "train"))
            print(f"wrote 50,000 CIFAR-shaped records in {time.perf_counter() - start:.1f} s")
        print(f"pipeline: {data}, per-process batch {args.batch}, {os.cpu_count()} CPUs")
        rates = {}
        for workers in args.workers:
            runs = [
                pipeline_images_per_second(
                    data,
                    workers=workers,
                    batch=args.batch,
                    batches=args.batches,
                    process_count=args.process_count,
                )
                for _ in range(args.repeats)
            ]
            rates[workers] = max(runs)
            shown = ", ".join(f"{r:,.0f}" for r in runs)
            print(f"  workers={workers}: {rates[workers]:,.0f} images/s (runs: {shown})")

    for config in args.configs:
        if not Path(config).exists():
            print(f"{config}: not found, skipped")
            continue
        print(f"train step of {config}:")
        step_rate = train_step_images_per_second(config, args.train_batch, args.train_steps)
        if step_rate:
            ratios = ", ".join(f"workers={w}: {r / step_rate:,.1f}x" for w, r in rates.items())
            print(f"  {step_rate:,.1f} images/s; pipeline / train step: {ratios}")


if __name__ == "__main__":
    main()

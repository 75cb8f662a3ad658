#!/usr/bin/env python
"""Sampling and FID-feature speed: 1-step and 2-step samples/s, and Inception images/s.

    python bench/sample.py                          # CIFAR config, 256 samples, real weights
    python bench/sample.py --config test --num 64 --random_inception

Samples come from freshly initialised EMA parameters (speed does not depend on the values), on
every device, with the trainer's own `Sampler`. Inception runs through the same sharded
`make_inception_fn` that FID uses, on uint8 32x32 images resized to 299x299 inside the jitted
function; `--random_inception` uses randomly initialised weights of the same shapes (same FLOPs)
where the converted weights file is absent. Prints a table and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jcdm.dev import benchmark  # noqa: E402
from jcdm.fid import fid, inception  # noqa: E402
from jcdm.training import sampler as sampler_lib  # noqa: E402
from jcdm.training import train as train_lib  # noqa: E402

CONFIGS = {
    "test": (["gin/smoke.gin"], []),
    "cifar": (["gin/joint.gin"], ["DATA_DIR='synthetic:32x32x3:4096'"]),
}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds incl. compile, median seconds of `repeats` later calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="cifar", choices=sorted(CONFIGS))
    p.add_argument("--num", type=int, default=256, help="samples per call")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--inception_batch", type=int, default=None, help="default: 50 CPU, 500 else")
    p.add_argument("--random_inception", action="store_true", help="random weights, same FLOPs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/sample_<b>)")
    args = p.parse_args()
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    print(benchmark.machine_line())

    files, bindings = CONFIGS[args.config]
    benchmark.configure(files, [*bindings, f"COMPUTE_DTYPE='{args.dtype}'"])
    built = train_lib.build(
        global_batch_size=jax.device_count(),  # the smallest the mesh accepts; not compiled
        seed=0,
        total_steps=1,
        ema_decay=0.999,
        compile_update=False,
    )
    built.data_it.close()
    state = jax.jit(built.init_fn, out_shardings=built.state_sh)(jnp.int32(0))
    sampler = sampler_lib.Sampler(
        built.networks, built.cfg, built.mesh, built.state_sh.ema_params, built.image_shape
    )
    rows = []
    for tag, sigmas in (("1-step", ()), ("2-step", (sampler.two_step_sigma,))):
        key = ("consistency", sigmas)

        def draw(key=key):
            return sampler.sample_global(state.ema_params, args.num, key, 0)

        first, per_call = timed(draw, args.repeats)
        rows.append(
            {
                "what": f"{tag} samples",
                "batch": args.num,
                "first_call_s": first,
                "call_s": per_call,
                "per_sec": args.num / per_call,
            }
        )

    if args.random_inception:
        params = inception.init_params(0)
    else:
        try:
            params = inception.load_params()
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"{e}\n(or pass --random_inception to time random weights)") from e
    ib = args.inception_batch or (50 if backend == "cpu" else 500)
    features = fid.make_inception_fn(params, built.mesh)
    images = np.random.default_rng(0).integers(0, 256, (ib, 32, 32, 3), dtype=np.uint8)
    first, per_call = timed(lambda: features(images), args.repeats)
    rows.append(
        {
            "what": "Inception (299x299 pool_3)",
            "batch": ib,
            "first_call_s": first,
            "call_s": per_call,
            "per_sec": ib / per_call,
        }
    )

    print(f"\n{'what':28s} {'batch':>6s} {'first call':>11s} {'per call':>9s} {'per sec':>9s}")
    for r in rows:
        print(
            f"{r['what']:28s} {r['batch']:6d} {r['first_call_s']:10.1f}s"
            f" {r['call_s']:8.3f}s {r['per_sec']:9.1f}"
        )
    out = Path(args.out or REPO / "bench" / "results" / f"sample_{backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"backend": backend, "device_kind": device, "devices": jax.device_count()},
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "config": args.config,
        "dtype": args.dtype,
        "random_inception": args.random_inception,
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

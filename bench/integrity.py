#!/usr/bin/env python
"""What the checkpoint hash manifest costs: hashing at save, verifying at restore, vs the restore.

    PYTHONPATH=. python bench/integrity.py                 # gin/joint.gin's state (1.3 GB)
    PYTHONPATH=. python bench/integrity.py --states test   # gin/smoke.gin's

The state is the trainer's TrainState structure from `jax.eval_shape` of its own init, filled
with normal noise (`bench/checkpoint.py`'s `abstract_train_state`, `materialize`). Through
`jcdm.runtime.checkpoint.Checkpointer` with synchronous saves on this process's devices, per
repeat: one save (of which `hash_s` is the manifest's hashing), then `restore_s` = Orbax's
restore alone (`Checkpointer._read`, no verification) and `restore_verified_s` =
`restore_latest` (metadata check + read + hash + compare; `verify_s` is the part after the
read), and `hash_only_s` = `integrity.local_sums` of the state alone. `*_cpu_s` are the same
regions in process CPU seconds (all threads), which a loaded machine inflates far less than
wall time. Medians of `--repeats`. Writes `bench/results/integrity_<platform>.json` unless
`--no-write`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint import FakeIterator, abstract_train_state, materialize  # noqa: E402

from jcdm.runtime import checkpoint as ckpt_lib  # noqa: E402
from jcdm.runtime import integrity  # noqa: E402


def bench(which: str, root: Path, repeats: int) -> dict:
    abstract, params = abstract_train_state(which)
    state = materialize(abstract, "random")
    leaves = jax.tree.leaves(state)
    nbytes = sum(x.nbytes for x in leaves)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    rows = []
    for i in range(repeats):
        directory = root / f"{which}-{i}"
        ckpt = ckpt_lib.Checkpointer(directory, ckpt_lib.CheckpointConfig(async_save=False))
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            ckpt.save(1, state, FakeIterator(), force=True)
            save_s, save_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            hash_s = ckpt.last_hash_s
            t0, c0 = time.perf_counter(), time.process_time()
            restored, _ = ckpt._read(1, target, with_data=False)
            jax.block_until_ready(restored)
            restore_s, restore_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            del restored
            t0, c0 = time.perf_counter(), time.process_time()
            restored, step = ckpt.restore_latest(target)
            jax.block_until_ready(restored)
            verified_s, verified_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            assert step == 1
            del restored
            verify_s = ckpt.last_verify_s
        finally:
            ckpt.close()
            shutil.rmtree(directory, ignore_errors=True)
        t0, c0 = time.perf_counter(), time.process_time()
        integrity.local_sums(state)
        hash_only_s, hash_only_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        rows.append(
            dict(
                save_s=save_s,
                hash_s=hash_s,
                hash_only_s=hash_only_s,
                restore_s=restore_s,
                restore_verified_s=verified_s,
                verify_s=verify_s,
                save_cpu_s=save_cpu_s,
                hash_only_cpu_s=hash_only_cpu_s,
                restore_cpu_s=restore_cpu_s,
                restore_verified_cpu_s=verified_cpu_s,
            )
        )
        print(which, i, {k: round(v, 3) for k, v in rows[-1].items()}, flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        "arrays": len(leaves),
        "bytes": nbytes,
        "params": params,
        "repeats": rows,
        "median": med,
        "hash_GBps": nbytes / med["hash_only_s"] / 1e9,
        "verify_over_restore": med["verify_s"] / med["restore_s"],
        "hash_cpu_over_restore_cpu": med["hash_only_cpu_s"] / med["restore_cpu_s"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--states", nargs="+", default=["cifar"], choices=["test", "cifar"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="jcdm-integrity-bench-"))
    platform = jax.devices()[0].platform
    out = {"jax": jax.__version__, "platform": platform, "devices": jax.device_count()}
    out["load_average_before"] = list(os.getloadavg())
    for which in args.states:
        out[which] = r = bench(which, root, args.repeats)
        m = r["median"]
        print(
            f"{which}: {r['arrays']} arrays, {r['bytes'] / 2**20:.0f} MiB; hash at save "
            f"{m['hash_s']:.2f}s of {m['save_s']:.2f}s ({r['hash_GBps']:.2f} GB/s); restore "
            f"{m['restore_s']:.2f}s, verified {m['restore_verified_s']:.2f}s (verify "
            f"{m['verify_s']:.2f}s = {100 * r['verify_over_restore']:.0f}% of the restore); CPU "
            f"seconds: hash {m['hash_only_cpu_s']:.2f}, restore {m['restore_cpu_s']:.2f} "
            f"({100 * r['hash_cpu_over_restore_cpu']:.0f}%)"
        )
    out["load_average_after"] = list(os.getloadavg())
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_write:
        path = Path(__file__).resolve().parent / "results" / f"integrity_{platform}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""How long a checkpoint save blocks the training loop: asynchronous vs synchronous saves.

    PYTHONPATH=. python bench/checkpoint.py                       # test and CIFAR-size states
    PYTHONPATH=. python bench/checkpoint.py --states cifar --saves 5 --dir /mnt/disk/tmp

States (no training; the TrainState structure comes from `jax.eval_shape` of the trainer's own
init, then is filled): `test` = gin/smoke.gin's networks (0.1M parameters, 696 arrays);
`cifar` = gin/joint.gin's (NCSN++ 56M + score head 26M parameters), each with RAdam moments and
the EMA copy (4 x 82M float32 = 1.3 GB). `--fill random` (default) writes normal noise, which
zstd cannot shrink, like trained weights; `--fill zeros` compresses to almost nothing and so
understates the write time.

Modes, all through jcdm.runtime.checkpoint.Checkpointer on this process's devices:
- `sync`: `async_save=False`; the loop waits for the whole write and commit.
- `orbax_async`: Orbax's asynchronous save; the loop waits for the device-to-host copy, the
  per-array metadata and the start barrier, then Orbax writes in a background thread.
- `background` (the trainer's default): an on-device copy of the state is dispatched and a thread
  runs Orbax's save of the copy; the loop waits only for the dispatch.

For each mode: one warm-up save (directory creation, compiling the copy), then `--saves` timed
saves. After each save the state is donated to a jitted update, as the train step does, and the
next save starts after the previous one is committed. Reported per mode (medians): `blocked` =
time inside `save()`; `+next step` = extra time of the update that follows the save, over the
same update without a save (what the loop really loses, including an on-device copy and
contention with the writer for host cores); `committed` = save start to commit. The target is
`blocked` under 10% of `sync`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gin  # noqa: E402
import jax  # noqa: E402

from jcdm.runtime import checkpoint as ckpt_lib  # noqa: E402

GIN_DIR = Path(__file__).resolve().parents[1] / "gin"
GIN = {"test": ("smoke.gin", (16, 16, 3)), "cifar": ("joint.gin", (32, 32, 3))}
MODES = {
    "sync": dict(async_save=False),
    "orbax_async": dict(async_save=True, background=False),
    "background": dict(async_save=True, background=True),
}


class FakeIterator:
    def __init__(self) -> None:
        self.next_batch = 0

    def get_state(self) -> dict:
        return {"next_batch": self.next_batch}


def abstract_train_state(which: str):
    """The trainer's TrainState structure for a gin config, without building data or a mesh."""
    import jcdm.register  # noqa: F401
    from jcdm.training import step as step_lib
    from jcdm.training import train

    gin_file, image_shape = GIN[which]
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN_DIR))  # smoke.gin includes joint.gin
    # gin logs an ERROR for each search path it probes before finding an include.
    logging.getLogger().addFilter(lambda r: not r.getMessage().startswith("Path not found"))
    gin.parse_config_files_and_bindings([str(GIN_DIR / gin_file)], [], finalize_config=False)
    cfg = train.ICTConfig()
    networks = train.make_networks(image_shape=image_shape, head_mode=cfg.head)
    tx = train.make_optimizer()
    init = lambda seed: step_lib.init_state(seed, networks, tx, image_shape)
    abstract = jax.eval_shape(init, np.int32(0))
    params = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in abstract.params.items()}
    gin.clear_config()
    return abstract, params


def materialize(abstract, fill: str):
    rng = np.random.default_rng(0)

    def leaf(a):
        if fill == "random" and np.issubdtype(a.dtype, np.floating):
            x = rng.standard_normal(a.shape, dtype=np.float32).astype(a.dtype)
        else:
            x = np.zeros(a.shape, a.dtype)
        return jax.device_put(x)

    return jax.tree.map(leaf, abstract)


def bench_mode(state, directory: Path, mode: str, saves: int):
    update = jax.jit(
        lambda s: jax.tree.map(lambda x: x + 1 if x.dtype == np.float32 else x, s),
        donate_argnums=0,
    )

    def step(s):
        t = time.perf_counter()
        s = update(s)
        jax.block_until_ready(s)
        return s, time.perf_counter() - t

    state, _ = step(state)  # compile
    baseline = []
    for _ in range(3):
        state, dt = step(state)
        baseline.append(dt)
    base = statistics.median(baseline)
    shutil.rmtree(directory, ignore_errors=True)
    ckpt = ckpt_lib.Checkpointer(directory, ckpt_lib.CheckpointConfig(keep=2, **MODES[mode]))
    blocked, extra, committed = [], [], []
    try:
        for i in range(saves + 1):  # the first save is a warm-up
            t0 = time.perf_counter()
            ckpt.save(i + 1, state, FakeIterator(), force=True)
            t_blocked = time.perf_counter() - t0
            state, dt = step(state)
            ckpt.wait()
            t_committed = time.perf_counter() - t0
            if i:
                blocked.append(t_blocked)
                extra.append(max(0.0, dt - base))
                committed.append(t_committed)
    finally:
        ckpt.close()
        shutil.rmtree(directory, ignore_errors=True)
    return state, {
        "blocked": statistics.median(blocked),
        "next": statistics.median(extra),
        "committed": statistics.median(committed),
        "step": base,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--states", nargs="+", default=["test", "cifar"], choices=sorted(GIN))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--saves", type=int, default=3, help="timed saves per mode (median)")
    p.add_argument("--fill", default="random", choices=["random", "zeros"])
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="jcdm-ckpt-bench-"))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, {root}")
    for which in args.states:
        abstract, params = abstract_train_state(which)
        state = materialize(abstract, args.fill)
        leaves = jax.tree.leaves(state)
        nbytes = sum(x.nbytes for x in leaves)
        counts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items())
        print(f"\n{which}: params {counts}; state {len(leaves)} arrays, {nbytes / 2**20:.1f} MiB")
        results = {}
        for mode in args.modes:  # in the order given: the first one runs on a colder disk cache
            state, results[mode] = bench_mode(state, root / f"{which}-{mode}", mode, args.saves)
        del state
        sync = results.get("sync", {}).get("blocked")
        print(f"  {'mode':12s} {'blocked':>9s} {'+next step':>11s} {'committed':>10s}  vs sync")
        for mode, r in results.items():
            ratio = f"{100 * r['blocked'] / sync:6.1f}%" if sync else ""
            print(
                f"  {mode:12s} {r['blocked']:8.3f}s {r['next']:10.3f}s {r['committed']:9.3f}s"
                f"  {ratio}",
                flush=True,
            )
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

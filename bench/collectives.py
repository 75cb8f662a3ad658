#!/usr/bin/env python
"""Latency of one cross-device sum (the collective a data-parallel step is made of) with the
same 8 CPU devices as 1 process x 8 and as 2 processes x 4 (gloo over loopback), plus the
number of all-reduce ops in the compiled train step of a config: together they explain the
2x4 / 1x8 step-time ratio bench/step.py --multihost prints.

    python bench/collectives.py [--config gin/smoke.gin] [--batch 32] [--pin]
    python bench/collectives.py --layouts 1x2 2x1    # one device per process instead
    python bench/collectives.py --profile            # + where process 0's step time goes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = (1, 1 << 20)  # floats per device: latency-bound, and a 4 MiB gradient-sized buffer


def worker(calls: int, config: str, batch: int, profile: str | None) -> None:
    """One process of the probe: a jitted sum over all devices, timed."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jcdm.runtime import distributed

    distributed.initialize(peer_watchdog=False)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    out = {}
    for size in SIZES:
        sh = NamedSharding(mesh, P("d"))
        n = jax.device_count()
        x = jax.make_array_from_callback(
            (n, size), sh, lambda idx, size=size: np.ones((1, size), np.float32)
        )
        f = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, P()))
        jax.block_until_ready(f(x))
        # One call at a time: independent calls in flight together can deadlock XLA:CPU's
        # collective rendezvous when 8 devices share 2 cores (seen: "only 5 of 8 arrived").
        t0 = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(f(x))
        out[size] = (time.perf_counter() - t0) / calls
    from jcdm.dev import benchmark

    benchmark.configure([config], [f"train.global_batch_size={batch}"])
    pdir = f"{profile}/p{jax.process_index()}" if profile else None
    t = benchmark.time_train_step(config, calls=3, rounds=3, profile_dir=pdir)
    out["step_s"] = t.step_s
    if t.profile:
        out["profile"] = {k: v for k, v in t.profile.items() if k != "top_kernels"}
        out["profile"]["top_ops"] = t.profile.get("top_ops", [])[:8]
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(out), flush=True)


def probe(
    num: int, devices: int, calls: int, config: str, batch: int, pin: bool, profile: str | None
) -> dict:
    from jcdm.dev.launch_local import free_port, process_env

    port = free_port()
    procs = [
        subprocess.Popen(
            (["taskset", "-c", str(i % os.cpu_count())] if pin and num > 1 else [])
            + [sys.executable, __file__, "--worker", f"--calls={calls}"]
            + [f"--config={config}", f"--batch={batch}"]
            + ([f"--profile_dir={profile}/{num}x{devices}"] if profile else []),
            cwd=REPO,
            env=process_env(i, num, devices, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    lines = [line for line in outs[0][0].splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{num}x{devices} probe failed:\n{outs[0][1][-3000:]}")
    line = lines[0]
    return json.loads(line[7:])


def count_all_reduces(config: str, batch: int) -> int:
    """All-reduce ops in the compiled train step on 8 devices (1 process)."""
    code = (
        "import re\n"
        "from jcdm import benchmark, train\n"
        f"benchmark.configure([{config!r}], ['train.global_batch_size={batch}'])\n"
        f"b = train.build(global_batch_size={batch}, seed=0, total_steps=100, ema_decay=0.9)\n"
        "t = b.update.as_text()\n"
        "ops = re.findall(r'^\\s*(?:ROOT )?%\\S+ = .* all-reduce(?:-start)?\\(', t, re.M)\n"
        "print('COUNT', len(ops))\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    m = re.search(r"COUNT (\d+)", r.stdout)
    if not m:
        raise SystemExit(r.stderr[-2000:])
    return int(m.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--pin", action="store_true", help="pin process i of 2x4 to CPU core i")
    p.add_argument(
        "--layouts", nargs=2, default=["1x8", "2x4"], help="PROCESSESxDEVICES, single first"
    )
    p.add_argument("--config", default="gin/smoke.gin")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "collectives_cpu.json"))
    p.add_argument("--profile", action="store_true", help="trace 2 steps per layout")
    p.add_argument("--profile_dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.calls, args.config, args.batch, args.profile_dir)
        return
    prof_root = "/tmp/jcdm-collectives-profile" if args.profile else None
    result = {"command": " ".join(sys.argv), "latency_s": {}}
    layouts = [tuple(int(v) for v in layout.split("x")) for layout in args.layouts]
    for num, devices in layouts:
        lat = probe(num, devices, args.calls, args.config, args.batch, args.pin, prof_root)
        result["latency_s"][f"{num}x{devices}"] = lat
        shown = ", ".join(f"{s} floats/device: {lat[str(s)] * 1e3:.2f} ms" for s in SIZES)
        print(f"{num}x{devices}: one all-reduce over all devices: {shown}", flush=True)
        print(f"{num}x{devices}: compiled train step alone: {lat['step_s'] * 1e3:.0f} ms")
        if "profile" in lat:
            from jcdm.dev import profiling

            print(profiling.format_summary(lat["profile"]), flush=True)
    n = count_all_reduces(args.config, args.batch)
    result["all_reduces_per_step"] = n
    lat = result["latency_s"]
    one, many = args.layouts
    extra = lat[many][str(SIZES[0])] - lat[one][str(SIZES[0])]
    result["step_ratio"] = {f"{many}/{one}": lat[many]["step_s"] / lat[one]["step_s"]}
    print(f"compiled step {many} / {one} = {lat[many]['step_s'] / lat[one]['step_s']:.2f}")
    result["estimated_extra_s_per_step"] = n * extra
    print(f"{args.config}: {n} all-reduce ops per step -> ~{n * extra * 1e3:.0f} ms more per step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

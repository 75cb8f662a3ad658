#!/usr/bin/env python
"""Train-step speed: compile time, step time, images/s, XLA FLOPs and utilisation, per head.

    python bench/step.py                                   # test + CIFAR configs, 3 heads, f32
    python bench/step.py --configs cifar --per_device_batch 128 256 512 --dtypes bfloat16 \\
        --steps_per_call 1 4 --out bench/results/step_gpu.json
    python bench/step.py --configs test --multihost        # + 2x4 vs 1x8 processes (CPU)
    python bench/step.py --configs cifar --heads none --profile 2   # + time per HLO op category
    python bench/step.py --configs test --variant conv "FIR_IMPL='conv'" \
        --variant separable "FIR_IMPL='separable'"         # variants compared in one run

Rows: every (config, per-device batch, dtype, steps_per_call, head) with head in `none` (plain
iCT), `vanilla` (head on detached features) and `joint`. Achieved FLOP/s = the convs' and
matmuls' FLOPs of the update (`jcdm.dev.benchmark.model_flops`) / measured step time. `mfu` is
that per device over the chip's datasheet dense peak at the dtype (`jcdm.dev.costs.PEAKS`; a
kind not in the table falls back to the matmul reference, and the row says which); `util` is
over the FLOP/s of a large jitted matmul of the same dtype measured just before the row. `ops` is
the compiled step's top-level instruction count (about its kernel launches). Ratios printed at
the end are taken within this one run (joint/ict step time against the FLOP ratio, each variant
against the first; 2x4/1x8 step time), then the full run's cost projected from the best rows
(`bench/cost.py` does the same from a saved JSON). The table is also written as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from jcdm.dev import benchmark, costs, profiling  # noqa: E402

HEADS = {"none": "ict", "vanilla": "vanilla", "joint": "joint"}
# Both configs read generated images of the right shape (no dataset needed) in-process.
CONFIGS = {
    "test": (["gin/smoke.gin"], []),
    "cifar": (
        ["gin/joint.gin"],
        ["DATA_DIR='synthetic:32x32x3:4096'", "make_train_iterator.worker_count=0"],
    ),
}
QUIET = ["EvalConfig.every=0", "CheckpointConfig.save_every=100000", "WandbConfig.mode='disabled'"]


def step_rows(args, on_row=lambda rows: None) -> list[dict]:
    """One row per (config, dtype, steps_per_call, head, variant); variants are adjacent so their
    ratio is taken minutes apart, and each row has its own matmul reference taken just before."""
    rows = []
    kind = jax.devices()[0].device_kind
    for config in args.configs:
        files, base = CONFIGS[config]
        batches = args.per_device_batch if config == "cifar" else [None]
        for pdb, dtype, spc, head, (label, *extra) in itertools.product(
            batches, args.dtypes, args.steps_per_call, args.heads, args.variant
        ):
            name = f"{config}/{HEADS[head]}/{dtype}/spc{spc}" + (f"/{label}" if label else "")
            gbs = []
            if pdb is not None:
                name = name.replace(f"{config}/", f"{config}/b{pdb}/", 1)
                gbs = [f"train.global_batch_size={pdb * jax.device_count()}"]
            bindings = [  # the last binding of a name wins: --bind and variants come last
                *base,
                *gbs,
                f"ICTConfig.head='{head}'",
                f"COMPUTE_DTYPE='{dtype}'",
                f"train.steps_per_call={spc}",
                *args.bind,
                *extra,
            ]
            if args.dry_run:  # parse the row's gin (unknown names fail here), build nothing
                benchmark.configure(files, bindings)
                print(f"  {name}: bindings parse", flush=True)
                continue
            if args.compile_only:  # fills $JAX_COMPILATION_CACHE_DIR for a timed run after
                benchmark.configure(files, bindings)
                built = benchmark.build_configured()
                built.data_it.close()
                print(f"  {name}: compiled in {built.compile_s:.1f}s", flush=True)
                continue
            matmul = benchmark.matmul_flops_per_sec(args.matmul_n, dtype)
            benchmark.configure(files, bindings)
            t = benchmark.time_train_step(
                name,
                calls=args.calls,
                rounds=args.rounds,
                profile_dir=f"{args.profile_dir}/{name.replace('/', '_')}"
                if args.profile
                else None,
                profile_calls=args.profile,
            )
            row = {"config": config, "head": HEADS[head], "dtype": dtype, "variant": label}
            row["per_device_batch"] = t.global_batch_size // t.devices
            row["bindings"] = [*args.bind, *extra]
            row.update(vars(t))
            row["matmul_flops_per_sec"] = matmul
            row["utilisation"] = t.flops_per_sec / t.devices / matmul
            peak = costs.datasheet_peak(kind, dtype)
            row["peak_flops_per_sec"] = peak or matmul
            row["mfu_basis"] = "datasheet" if peak else "matmul (no datasheet peak for this kind)"
            row["mfu"] = t.flops_per_sec / t.devices / row["peak_flops_per_sec"]
            rows.append(row)
            on_row(rows)
            print(
                f"  {name:44s} compile {t.compile_s:6.1f}s  step {t.step_s * 1e3:9.1f}ms"
                f"  {t.images_per_sec:8.1f} img/s  {t.flops_per_step / 1e9:8.1f} GFLOP"
                f"  {t.flops_per_sec / 1e12:7.3f} TFLOP/s  mfu {row['mfu']:.3f}"
                f" ({'datasheet' if peak else 'matmul'})  util {row['utilisation']:.2f}"
                f" (matmul {matmul / 1e12:.3f})  ops {t.entry_ops.get('total', 0)}"
                f"  loss {t.loss_first:.3f}",
                flush=True,
            )
            if t.profile:
                print(profiling.format_summary(t.profile), flush=True)
    return rows


def multihost_rows(args) -> list[dict]:
    """The trainer itself under jcdm.dev.launch_local: 1 process x 8 devices vs 2 x 4, same global
    batch; images/s is the trainer's own (metrics.jsonl), median of the rows after the first."""
    files, base = CONFIGS[args.multihost_config]
    out = []
    for num, devices in ((1, 8), (2, 4)):
        with tempfile.TemporaryDirectory(prefix="jcdm-bench-mh-") as workdir:
            trainer = ["--gin", *files]
            for b in [
                *base,
                *QUIET,
                f"train.num_steps={args.multihost_steps}",
                "train.log_every=1",
                f"train.global_batch_size={args.multihost_batch}",
            ]:
                trainer += ["--gin_bindings", b]
            cmd = [
                sys.executable,
                "-m",
                "jcdm.dev.launch_local",
                f"--num_processes={num}",
                f"--devices_per_process={devices}",
                "--",
                *trainer,
                "--workdir",
                workdir,
            ]
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if r.returncode != 0:
                tail = r.stderr[-3000:]
                raise SystemExit(f"{num}x{devices} run failed ({r.returncode}):\n{tail}")
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                metrics = [json.loads(line) for line in f if line.strip()]
            ips = [m["images_per_sec"] for m in metrics[args.multihost_skip :]]
            compile_s = metrics[0].get("compile_s", float("nan"))
        rate = statistics.median(ips)
        out.append(
            {
                "layout": f"{num}x{devices}",
                "config": args.multihost_config,
                "global_batch_size": args.multihost_batch,
                "images_per_sec": rate,
                "step_s": args.multihost_batch / rate,
                "compile_s": compile_s,
                "rows": len(ips),
            }
        )
        print(f"  {num}x{devices}: {rate:8.1f} img/s (median of {len(ips)} steps)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["test", "cifar"], choices=sorted(CONFIGS))
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--steps_per_call", nargs="+", type=int, default=[1])
    p.add_argument(
        "--per_device_batch",
        nargs="+",
        type=int,
        default=None,
        help="the cifar config's batch per device (x devices = global); default 8 on CPU, 128 else",
    )
    p.add_argument("--bind", nargs="*", default=[], help="extra gin bindings for every row")
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar=("LABEL", "BINDING"),
        help="LABEL then gin bindings; repeat to compare variants in one run (rows adjacent)",
    )
    p.add_argument("--calls", type=int, default=3, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--matmul_n", type=int, default=None, help="default: 2048 on CPU, 8192 else")
    p.add_argument("--multihost", action="store_true", help="also 1x8 vs 2x4 processes (CPU)")
    p.add_argument("--multihost_config", default="test", choices=sorted(CONFIGS))
    p.add_argument("--multihost_batch", type=int, default=32)
    p.add_argument("--multihost_steps", type=int, default=12)
    p.add_argument("--multihost_skip", type=int, default=2, help="rows dropped as warm-up")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/step_<backend>)")
    p.add_argument("--profile", type=int, default=0, help="trace N calls per row (jax.profiler)")
    p.add_argument("--dry_run", action="store_true", help="parse every row's gin, time nothing")
    p.add_argument(
        "--compile_only",
        action="store_true",
        help="compile every row, time nothing (with JAX_COMPILATION_CACHE_DIR: warm the cache)",
    )
    p.add_argument("--profile_dir", default="/tmp/jcdm-profile", help="where traces are written")
    args = p.parse_args()

    backend = jax.default_backend()
    cpu = backend == "cpu"
    args.per_device_batch = args.per_device_batch or [8 if cpu else 128]
    args.matmul_n = n = args.matmul_n or (2048 if cpu else 8192)
    args.variant = args.variant or [[""]]
    device = jax.devices()[0].device_kind
    print(benchmark.machine_line())
    out = Path(args.out or REPO / "bench" / "results" / f"step_{backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {
            "backend": backend,
            "device_kind": device,
            "devices": jax.device_count(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "platform": platform.platform(),
        },
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "matmul_n": n,
        "steps": [],
    }

    def save(rows: list[dict]) -> None:  # after every row: a timed-out run keeps what it has
        def key(r, *fields):
            return tuple(
                r[f] for f in ("config", "per_device_batch", "dtype", "steps_per_call", *fields)
            )

        for row in rows:
            ict = [
                r for r in rows if r["head"] == "ict" and key(r, "variant") == key(row, "variant")
            ]
            first = [r for r in rows if key(r, "head") == key(row, "head")]
            row["step_vs_ict"] = row["step_s"] / ict[0]["step_s"] if ict else float("nan")
            row["flops_vs_ict"] = (
                row["flops_per_step"] / ict[0]["flops_per_step"] if ict else float("nan")
            )
            row["step_vs_first_variant"] = row["step_s"] / first[0]["step_s"]
        result["steps"] = rows
        out.write_text(json.dumps(result, indent=1))

    rows = step_rows(args, save)
    if args.dry_run or args.compile_only:
        return
    print(
        f"\n  {'config/batch/head/dtype/spc/variant':44s}     img/s    mfu   util   ops"
        "  time vs ict (FLOPs vs ict)  vs variant 1"
    )
    for row in rows:
        print(
            f"  {row['name']:44s} {row['images_per_sec']:9.1f}  {row['mfu']:5.3f}"
            f"  {row['utilisation']:5.2f}  {row['entry_ops'].get('total', 0):5d}"
            f"  {row['step_vs_ict']:5.3f}x ({row['flops_vs_ict']:5.3f}x)"
            f"           {row['step_vs_first_variant']:5.2f}x"
        )
    for dtype in args.dtypes:
        try:
            flops, util, chosen = costs.from_step_rows(rows, jax.devices()[0].device_kind, dtype)
        except ValueError as e:  # no cifar rows, or a device kind without a datasheet peak
            print(f"\nno cost projection at {dtype}: {e}")
            continue
        table = costs.cost_table(flops, util, dtype=dtype)
        result.setdefault("cost_projection", {})[dtype] = {
            "from_rows": chosen,
            "rows": [dataclasses.asdict(r) for r in table],
        }
        print(f"\ncost at {dtype}, from {chosen}:\n{costs.format_table(table)}")
        out.write_text(json.dumps(result, indent=1))
    if args.multihost:
        print("\nmulti-process (trainer under jcdm.dev.launch_local, CPU devices):")
        mh = multihost_rows(args)
        result["multihost"] = mh
        ratio = mh[1]["step_s"] / mh[0]["step_s"]
        result["multihost_ratio_2x4_over_1x8"] = ratio
        print(f"  step time 2x4 / 1x8 = {ratio:.3f} (target <= 1.15)")
        out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

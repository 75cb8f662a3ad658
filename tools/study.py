#!/usr/bin/env python
"""A seeded comparison of arms (joint / vanilla / ict): train, evaluate, report, with intervals.

    python tools/study.py --preset digits --root runs/study_digits --seeds 0,1,2 \\
        --out bench/results/study_digits [--parallel 2] [--nice 5]
    python tools/study.py --preset cifar10 --root gs://BUCKET/study --fid-stats FILE --dry-run

Each arm x seed is a real `jcdm` training process in `<root>/<arm>/seed<k>`, keeping a
checkpoint at every evaluation point. A finished run (its last checkpoint committed) is skipped,
an interrupted one resumes from its newest checkpoint (the trainer's own restart). Then every
run is evaluated from its checkpoints' EMA parameters, 1-step and 2-step
(`tools/studylib/evaluate.py`, one process per run, resumable), and the report is written:
`<out>.json` (every per-run number), `<out>.png` (metric against step per arm, mean and 95% band
over seeds) and `<out>.md` (final metric per arm with 95% intervals; paired differences
joint - vanilla and joint - ict over seeds with bootstrap intervals, at equal steps and, for
ict, at equal compute: a joint step costs --joint-cost ict steps).

Per seed, every arm gets the same `train.seed`: the same backbone initialisation (the head's
init key is split off separately), the same data order and the same lr / EMA / batch, since arms
differ only in their gin file and bindings. Arms: `--arm NAME=GIN[:BINDING;BINDING...]`.
`--dry-run` prints the plan, each run's state and the projected cost, and runs nothing.
`--from-json <out>.json --out PREFIX` writes the report again from a study's JSON alone (its plan
and every per-run number), for a study whose workdirs are gone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from etils import epath

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.studylib import report  # noqa: E402
from tools.studylib.evaluate import eval_file  # noqa: E402

# name -> arms (name, gin file, bindings), steps, evaluation points, metric, samples per point
PRESETS = {
    "digits": {
        "arms": {
            "joint": ("gin/demo.gin", ["ICTConfig.head='joint'"]),
            "vanilla": ("gin/demo.gin", ["ICTConfig.head='vanilla'"]),
            "ict": ("gin/demo.gin", ["ICTConfig.head='none'"]),
        },
        "steps": 400,
        "evals": 5,
        "metric": "digits",
        "num_samples": 1000,
    },
    "cifar10": {
        "arms": {
            "joint": ("gin/joint.gin", []),
            "vanilla": ("gin/vanilla.gin", []),
            "ict": ("gin/ict.gin", []),
        },
        "steps": 400_000,
        "evals": 8,
        "metric": "inception",
        "num_samples": 50_000,
    },
}
# What every study run binds on top of its arm (besides seed, steps and checkpoint spacing):
# no W&B, no in-training FID or grids (the study evaluates and draws from checkpoints).
COMMON_BINDINGS = ["WandbConfig.mode='disabled'", "FIDConfig.every=0"]


def parse_arm(text: str) -> tuple[str, tuple[str, list[str]]]:
    name, _, rest = text.partition("=")
    gin_file, _, bindings = rest.partition(":")
    if not name or not gin_file:
        raise SystemExit(f"--arm {text!r}: expected NAME=GIN[:BINDING;BINDING...]")
    return name, (gin_file, [b for b in bindings.split(";") if b])


def make_plan(args) -> dict:
    preset = PRESETS[args.preset]
    arms = dict(parse_arm(a) for a in args.arm) if args.arm else preset["arms"]
    steps = args.steps or preset["steps"]
    evals = args.evals or preset["evals"]
    if getattr(args, "eval_steps", None):
        eval_steps = sorted(int(s) for s in args.eval_steps.split(","))
        if eval_steps[-1] != steps or eval_steps[0] <= 0:
            raise SystemExit(f"--eval-steps {args.eval_steps}: must be positive and end at {steps}")
    elif steps % evals:
        raise SystemExit(f"--steps {steps} must be a multiple of --evals {evals}")
    else:
        eval_steps = [steps // evals * (i + 1) for i in range(evals)]
    return {
        "preset": args.preset,
        "arms": {k: {"gin": g, "bindings": b} for k, (g, b) in arms.items()},
        "seeds": [int(s) for s in args.seeds.split(",")],
        "steps": steps,
        "eval_steps": eval_steps,
        "metric": args.metric or preset["metric"],
        "num_samples": args.num_samples or preset["num_samples"],
        "fid_stats": args.fid_stats,
        "extra_bindings": args.binding,
        "root": args.root,
        "joint_cost": args.joint_cost,
    }


def workdir(plan: dict, arm: str, seed: int) -> str:
    return os.path.join(plan["root"], arm, f"seed{seed}")


def train_command(plan: dict, arm: str, seed: int) -> list[str]:
    a = plan["arms"][arm]
    every = math.gcd(*plan["eval_steps"])  # a checkpoint at every evaluation point, all kept
    bindings = [
        *a["bindings"],
        f"train.seed={seed}",
        f"train.num_steps={plan['steps']}",
        f"CheckpointConfig.save_every={every}",
        f"CheckpointConfig.keep={plan['steps'] // every + 1}",
        "EvalConfig.every=0",  # grids come from the evaluation (tools/studylib/evaluate.py)
        *COMMON_BINDINGS,
        *plan["extra_bindings"],
    ]
    cmd = [sys.executable, "-m", "jcdm", "--gin", a["gin"], "--workdir", workdir(plan, arm, seed)]
    for b in bindings:
        cmd += ["--gin_bindings", b]
    return cmd


def committed_steps(wd: str) -> list[int]:
    """Checkpoint steps with Orbax's commit marker (local or a bucket, through etils)."""
    ck = epath.Path(wd) / "checkpoints"
    if not ck.exists():
        return []
    return sorted(
        int(p.name)
        for p in ck.iterdir()
        if p.name.isdigit() and (p / "commit_success.txt").exists()
    )


def run_state(plan: dict, arm: str, seed: int) -> str:
    wd = workdir(plan, arm, seed)
    steps = committed_steps(wd)
    if plan["steps"] in steps:
        evaluated = epath.Path(wd) / eval_file(plan["metric"], plan["num_samples"])
        if evaluated.exists() and all(
            str(s) in json.loads(evaluated.read_text()) for s in plan["eval_steps"]
        ):
            return "evaluated"
        return "trained"
    return f"partial (step {steps[-1]})" if steps else "new"


def _run(cmd: list[str], log_path: str, nice: int) -> int:
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    full = (["nice", "-n", str(nice)] if nice else []) + cmd
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(full)}\n")
        log.flush()
        return subprocess.call(full, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def train_and_evaluate(plan: dict, arm: str, seed: int, nice: int) -> None:
    wd = workdir(plan, arm, seed)
    t0 = time.time()
    if plan["steps"] not in committed_steps(wd):
        rc = _run(train_command(plan, arm, seed), os.path.join(wd, "train.log"), nice)
        if rc != 0:
            raise RuntimeError(f"{arm} seed {seed}: training exited {rc}; see {wd}/train.log")
    cmd = [
        sys.executable,
        "-m",
        "tools.studylib.evaluate",
        wd,
        "--steps",
        ",".join(map(str, plan["eval_steps"])),
        "--metric",
        plan["metric"],
        "--num-samples",
        str(plan["num_samples"]),
    ] + (["--fid-stats", plan["fid_stats"]] if plan["fid_stats"] else [])
    rc = _run(cmd, os.path.join(wd, "eval.log"), nice)
    if rc != 0:
        raise RuntimeError(f"{arm} seed {seed}: evaluation exited {rc}; see {wd}/eval.log")
    print(f"{arm} seed {seed}: done in {time.time() - t0:.0f}s", flush=True)


def dry_run(plan: dict, step_jsons: list[str], dtype: str) -> None:
    print(json.dumps({k: v for k, v in plan.items()}, indent=1))
    print("\nruns:")
    for seed in plan["seeds"]:
        for arm in plan["arms"]:
            try:
                state = run_state(plan, arm, seed)
            except Exception as e:  # e.g. a bucket not reachable from here: the plan still prints
                state = f"unknown ({type(e).__name__}: {str(e)[:80]})"
            print(f"  {arm:8s} seed {seed}: {state}")
            print(f"    {shlex.join(train_command(plan, arm, seed))}")
    if step_jsons:
        from jcdm.dev import costs

        results = [json.loads(Path(f).read_text()) for f in step_jsons]
        rows = [r for res in results for r in res["steps"]]
        kind = results[0]["machine"]["device_kind"]
        flops, util, _ = costs.from_step_rows(rows, kind, dtype)
        n_seeds = len(plan["seeds"])
        print(
            f"\nprojected training cost from {', '.join(step_jsons)} ({kind}, {dtype}; train "
            "steps only, add evaluation and restarts):"
        )
        total = 0.0
        for arm in plan["arms"]:
            method = arm if arm in flops else ("joint" if arm != "ict" else None)
            if method not in flops:
                print(f"  {arm}: no measured step for it in the step JSONs")
                continue
            table = costs.cost_table(
                {arm: flops[method]}, {arm: util[method]}, dtype=dtype, steps=plan["steps"]
            )
            print(costs.format_table(table, steps=plan["steps"]))
            total += table[-1].device_hours * n_seeds
        print(f"the study ({n_seeds} seeds per arm) on 8x H200: {total:,.0f} GPU-hours")


def write_report(result: dict, out: str | None) -> None:
    plan = result["plan"]
    key = "fd" if plan["metric"] == "digits" else "fid"
    summary = report.summarize(result, key=key, ratio=plan["joint_cost"])
    prefix = Path(out or os.path.join(plan["root"], "study"))
    report.write(result, summary, prefix, title=f"study: {plan['preset']}, {plan['metric']} metric")
    print(report.markdown(summary))
    print(f"wrote {prefix}.json, .png, .md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    p.add_argument("--arm", action="append", default=[], help="NAME=GIN[:B1;B2] (repeatable)")
    p.add_argument("--binding", action="append", default=[], help="gin binding for every arm")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--evals", type=int, default=None, help="evaluation points, evenly spaced")
    p.add_argument(
        "--eval-steps", default=None, help="evaluation points, comma-separated (not --evals)"
    )
    p.add_argument("--metric", choices=["digits", "inception"], default=None)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--fid-stats", default=None, help="FID statistics (tools/fid_stats.py)")
    p.add_argument("--root", default="runs/study_digits")
    p.add_argument("--out", default=None, help="prefix of the .json/.png/.md outputs")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--nice", type=int, default=5)
    p.add_argument("--joint-cost", type=float, default=4 / 3, help="a joint step in ict steps")
    p.add_argument("--report-only", action="store_true", help="report what is evaluated")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument(
        "--step-json", action="append", default=[], help="bench/step.py result(s) for costs"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--from-json", default=None, help="a study's .json: report from it alone")
    args = p.parse_args()
    if args.from_json:
        if not Path(args.from_json).is_file():
            p.error(f"--from-json {args.from_json}: no such file (a study's <out>.json)")
        result = json.loads(Path(args.from_json).read_text())
        write_report({"plan": result["plan"], "runs": result["runs"]}, args.out)
        return
    try:
        plan = make_plan(args)
    except SystemExit as e:  # a bad argument: usage and exit 2, never worth a retry
        p.error(str(e.code))
    if plan["metric"] == "inception" and not plan["fid_stats"]:
        p.error("the inception metric needs --fid-stats (a file from tools/fid_stats.py)")
    if args.dry_run:
        dry_run(plan, args.step_json, args.dtype)
        return
    if not args.report_only:
        jobs = [(a, s) for s in plan["seeds"] for a in plan["arms"]]  # seed-major: whole seeds
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = [pool.submit(train_and_evaluate, plan, a, s, args.nice) for a, s in jobs]
            errors = [f.exception() for f in futures if f.exception() is not None]
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
    evals = {}
    for arm in plan["arms"]:
        for seed in plan["seeds"]:
            path = epath.Path(workdir(plan, arm, seed)) / eval_file(
                plan["metric"], plan["num_samples"]
            )
            if path.exists():
                rows = json.loads(path.read_text())
                if all(str(s) in rows for s in plan["eval_steps"]):
                    evals[(arm, seed)] = rows
    write_report(report.collect(plan, evals), args.out)
    if not args.report_only and errors:
        sys.exit(1)


if __name__ == "__main__":
    main()

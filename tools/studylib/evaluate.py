"""One study run's evaluation: every kept checkpoint's EMA parameters, 1-step and 2-step.

    python -m tools.studylib.evaluate WORKDIR --steps 80,160 --metric digits --num-samples 1000 \\
        [--fid-stats FILE] [--seed 0]

Runs as its own process (the run's `config.gin` configures gin, which is process-global) and
writes `WORKDIR/study_eval_<metric>_n<samples>_s<seed>.json` after each checkpoint, so an
interrupted evaluation continues where it stopped, and an evaluation with other settings (more
samples, another seed or metric) never reuses these numbers. Every run of a study samples with
the same seeds: the arms are compared on common noise, which makes the paired differences less
noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def eval_file(metric: str, num_samples: int, seed: int = 0) -> str:
    """The file holding a run's numbers for these evaluation settings."""
    return f"study_eval_{metric}_n{num_samples}_s{seed}.json"


def evaluate_run(
    workdir: str,
    steps: list[int],
    *,
    metric: str,
    num_samples: int,
    fid_stats: str | None = None,
    seed: int = 0,
    batch_size: int = 500,
) -> dict:
    """{str(step): {"1step": {...}, "2step": {...}}} for every step in `steps`, reusing the
    numbers already in the run's file for these settings (`eval_file`)."""
    import numpy as np

    from jcdm.main import parse_gin
    from jcdm.runtime import checkpoint as ckpt_lib
    from jcdm.runtime import io, reporting
    from jcdm.training import evaluation
    from jcdm.training import sampler as sampler_lib
    from jcdm.training import train as train_lib

    if "://" not in workdir:
        workdir = os.path.abspath(workdir)  # Orbax refuses relative checkpoint paths
    out_path = io.path(workdir) / eval_file(metric, num_samples, seed)  # local or a bucket
    done = json.loads(out_path.read_text()) if out_path.exists() else {}
    todo = [s for s in steps if str(s) not in done]
    if not todo:
        return done
    with tempfile.NamedTemporaryFile("w", suffix=".gin") as cfg:  # a bucket's config too
        cfg.write(io.read_text(os.path.join(workdir, "config.gin")))
        cfg.flush()
        parse_gin([cfg.name], [])
    two_step = evaluation.EvalConfig().two_step_sigma  # the run's own, from its config.gin
    built = train_lib.build_for_sampling()
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    have = checkpointer.all_steps()
    missing = [s for s in todo if s not in have]
    if missing:
        raise SystemExit(f"{workdir}: no checkpoints at steps {missing} (have {have})")
    sampler = sampler_lib.Sampler(
        built.networks, built.cfg, built.mesh, built.state_sh.ema_params, built.image_shape
    )
    if metric == "digits":
        from jcdm.fid import digits

        digits_metric = digits.DigitsEvaluator()
    else:
        fid_eval = evaluation.FIDEvaluator(
            sampler, stats_path=fid_stats, num_samples=num_samples, batch_size=batch_size
        )
    target = ckpt_lib.abstract_with_shardings(built.abstract_state, built.state_sh)
    for step in todo:
        t0 = time.perf_counter()
        ema = checkpointer.restore(step, target).ema_params
        row = {}
        for tag, sigmas in (("1step", ()), ("2step", (two_step,))):
            if metric == "digits":
                images = np.concatenate(
                    [
                        sampler.sample(ema, min(batch_size, num_samples - i), sigmas, seed=seed + i)
                        for i in range(0, num_samples, batch_size)
                    ]
                )
                row[tag] = digits_metric(images)
                if step == steps[-1]:
                    u8 = reporting.to_uint8(images[:64])
                    reporting.save_png(
                        io.path(workdir) / f"grid_{tag}_{step}.png", reporting.image_grid(u8), 4
                    )
            else:
                row[tag] = {"fid": fid_eval(ema, sigmas, seed=seed)}
        row["seconds"] = time.perf_counter() - t0
        done[str(step)] = row
        io.write_json(out_path, done)  # atomic: an interrupted evaluation keeps what it had
        print(f"{workdir} step {step}: {json.dumps(row)}", flush=True)
    checkpointer.close()
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--steps", required=True, help="comma-separated checkpoint steps")
    p.add_argument("--metric", choices=["digits", "inception"], default="digits")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--fid-stats", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.metric == "inception" and not args.fid_stats:
        raise SystemExit("--metric inception needs --fid-stats (a file from tools/fid_stats.py)")
    evaluate_run(
        args.workdir,
        [int(s) for s in args.steps.split(",")],
        metric=args.metric,
        num_samples=args.num_samples,
        fid_stats=args.fid_stats,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()

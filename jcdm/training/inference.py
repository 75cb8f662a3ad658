"""Inference only: a checkpoint's EMA parameters -> samples (.npz + PNG grid) and optional FID.

    jcdm --gin gin/joint.gin --workdir W --only_inference \\
        --gin.inference.num_samples=50000 --gin.inference.fid_stats="'cifar10_train.npz'"

Writes `<workdir>/inference/step_<N>/` with `samples_<k>step.npz` (uint8 NHWC, key `images`),
`grid_<k>step.png`, optionally `samples_edm<n>.npz` from the score head as an EDM sampler, and
`results.json` (step, counts, FIDs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import gin
import jax
import numpy as np

from jcdm.runtime import checkpoint as ckpt_lib
from jcdm.runtime import io, reporting
from jcdm.training import evaluation
from jcdm.training import sampler as sampler_lib
from jcdm.training import train as train_lib

log = logging.getLogger(__name__)

# FIDEvaluator seeds batch i with seed + i: sets this far apart never share a batch's noise.
SEED_SET_STRIDE = 1_000_000


@gin.configurable(module="jcdm", denylist=["workdir"])
def inference(
    *,
    workdir: str,
    checkpoint_step: int | str = "latest",
    num_samples: int = 64,
    sampler_steps: Sequence[int] = (1, 2),
    intermediate_sigmas: Sequence[float] | None = None,
    head_sampler_steps: int = 0,
    fid_stats: str | None = None,
    batch_size: int = 500,
    seed: int = 0,
    fid_seed_sets: int = 1,
) -> dict:
    """`checkpoint_step`: "latest", "best" (lowest fid_1step stored with the checkpoints) or a step.
    `sampler_steps`: consistency sampling with k steps; the intermediate sigmas default to iCT's
    0.821 for 2 steps and to the Karras grid otherwise, unless `intermediate_sigmas` (for the
    largest k) is given. `head_sampler_steps` > 0 also samples the score head with EDM's Heun
    sampler (2n - 1 evaluations). `fid_seed_sets` > 1: EDM's protocol, FID over that many
    independent sets of `num_samples` (set j draws from seed + j * SEED_SET_STRIDE), each
    reported (fid_<k>step_sets) with their mean and minimum; fid_<k>step stays the first set's.
    """
    if fid_seed_sets < 1:
        raise ValueError(f"inference.fid_seed_sets must be >= 1, got {fid_seed_sets}")
    # Nothing is created for a workdir that holds no run (a typo): that is exit 2, not a retry.
    ckpt_dir = io.path(workdir) / "checkpoints"
    if not io.exists(workdir):
        raise FileNotFoundError(
            f"workdir {workdir} does not exist: pass the --workdir of a training run"
        )
    if not io.exists(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}: train first")
    built = train_lib.build_for_sampling()
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {ckpt_dir}: train first")
        target = ckpt_lib.abstract_with_shardings(built.abstract_state, built.state_sh)
        if checkpoint_step == "latest":
            # As training does: verified, a damaged newest one moved aside for the one before.
            state, step = checkpointer.restore_latest(target)
        else:
            # A step the user chose is restored and verified, or refused; never another one.
            step = _choose_step(checkpointer, steps, checkpoint_step)
            state = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    ema = state.ema_params
    sampler = sampler_lib.Sampler(
        built.networks, built.cfg, built.mesh, built.state_sh.ema_params, built.image_shape
    )
    out_dir = io.path(workdir) / "inference" / f"step_{step}"  # local or a bucket
    is_main = jax.process_index() == 0
    if is_main:
        io.mkdirs(out_dir)
    results: dict = {"step": step, "num_samples": num_samples}
    fid_eval = None
    if fid_stats:
        fid_eval = evaluation.FIDEvaluator(
            sampler, stats_path=fid_stats, num_samples=num_samples, batch_size=batch_size
        )
    for k in sampler_steps:
        sigmas = _intermediate(k, intermediate_sigmas, built.cfg)
        images = np.concatenate(
            [
                sampler.sample(ema, min(batch_size, num_samples - i), sigmas, seed=seed + i)
                for i in range(0, num_samples, batch_size)
            ]
        )
        results[f"sigmas_{k}step"] = [built.cfg.sigma_max, *sigmas]
        if is_main:
            _write(out_dir, f"{k}step", images)
        if fid_eval is not None:
            fids = [
                fid_eval(ema, sigmas, seed=seed + j * SEED_SET_STRIDE) for j in range(fid_seed_sets)
            ]
            results[f"fid_{k}step"] = fids[0]
            if fid_seed_sets > 1:
                results[f"fid_{k}step_sets"] = fids
                results[f"fid_{k}step_mean"] = float(np.mean(fids))
                results[f"fid_{k}step_min"] = float(np.min(fids))
            log.info("FID %d-step: %s", k, ", ".join(f"{f:.3f}" for f in fids))
    if head_sampler_steps:
        images = np.concatenate(
            [
                sampler.sample_head(
                    ema, min(batch_size, num_samples - i), head_sampler_steps, seed=seed + i
                )
                for i in range(0, num_samples, batch_size)
            ]
        )
        if is_main:
            _write(out_dir, f"edm{head_sampler_steps}", images)
    if is_main:
        io.write_json(out_dir / "results.json", results)
    log.info("inference results in %s: %s", out_dir, results)
    return results


def _choose_step(checkpointer, steps: list[int], choice) -> int:
    if choice == "latest":
        return steps[-1]
    if choice == "best":
        best = checkpointer.best_step()
        if best is None:
            raise ValueError("no checkpoint stores fid_1step; train with FIDConfig.every > 0")
        return best
    if int(choice) not in steps:
        raise ValueError(f"no checkpoint at step {choice}; have {steps}")
    return int(choice)


def _intermediate(k: int, given, cfg) -> tuple[float, ...]:
    if k < 1:
        raise ValueError(f"sampler steps must be >= 1, got {k}")
    if given is not None and len(given) == k - 1:
        return tuple(float(s) for s in given)
    if k == 2:
        return (evaluation.EvalConfig().two_step_sigma,)
    from jcdm.ict.schedules import karras_sigmas

    grid = np.asarray(karras_sigmas(k + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho))[::-1]
    return tuple(float(s) for s in grid[1:-1])


def _write(out_dir, tag: str, images: np.ndarray) -> None:
    u8 = reporting.to_uint8(images)
    io.write_npz(io.path(out_dir) / f"samples_{tag}.npz", images=u8)
    grid = reporting.image_grid(u8[:64])
    reporting.save_png(io.path(out_dir) / f"grid_{tag}.png", grid, max(1, 128 // u8.shape[1]))


def run(*, workdir: str) -> dict:
    return inference(workdir=workdir)

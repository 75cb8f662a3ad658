"""Evaluation during training: sample grids and FID at fixed step intervals.

`EvalConfig` and `FIDConfig` are gin configurables like `CheckpointConfig`; `PeriodicEval` owns
the decision of when to evaluate, so the loop reads as "update, log, evaluate, save".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import gin
import jax
import numpy as np

from jcdm.ict import sampling
from jcdm.runtime import reporting
from jcdm.training.sampler import Sampler

log = logging.getLogger(__name__)


@gin.configurable(module="jcdm")
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Sample grids from the EMA parameters (docs/recipe.md sections 1-2).

    `every`: steps between grids (0: none); each grid has `num_grid_samples` 1-step and 2-step
    samples, the 2-step sampler stopping at `two_step_sigma` (iCT: 0.821; the reference: 0.661).
    `head_heun_steps` > 0 adds a grid of the score head sampled as an EDM diffusion model with
    that many Heun steps (the reference's training-time grids). Inference uses the same
    `two_step_sigma`.
    """

    every: int = 1000
    num_grid_samples: int = 64
    two_step_sigma: float = sampling.TWO_STEP_SIGMA
    head_heun_steps: int = 0

    def __post_init__(self):
        if self.every < 0 or self.num_grid_samples < 1 or self.head_heun_steps < 0:
            raise ValueError(
                f"EvalConfig needs every >= 0, num_grid_samples >= 1 and head_heun_steps >= 0 "
                f"(got {self.every}, {self.num_grid_samples}, {self.head_heun_steps})"
            )


@gin.configurable(module="jcdm")
@dataclasses.dataclass(frozen=True)
class FIDConfig:
    """FID of 1- and 2-step samples during training (docs/recipe.md section 1: 50,000 samples
    against the CIFAR-10 train-set statistics made by tools/fid_stats.py).

    `every`: steps between measurements (0: never); logged as fid_1step / fid_2step and stored
    with the checkpoints (`CheckpointConfig.keep_best_fid` ranks by it).
    `features`: 'inception' (FID), or 'digits' for the embedded 16x16 digits
    (`jcdm.fid.digits`: a small classifier's features, seconds instead of minutes; no `stats`
    needed) logged as digits_fd_1step plus digits_classes / digits_evenness / digits_nn_rms
    (class coverage and the distance to the nearest training image).
    """

    every: int = 0
    num_samples: int = 50_000
    batch_size: int = 500
    stats: str | None = None
    inception_weights: str | None = None
    features: str = "inception"

    def __post_init__(self):
        if self.features not in ("inception", "digits"):
            raise ValueError(
                f"FIDConfig.features={self.features!r}: choose 'inception' or 'digits' (the "
                "embedded 16x16 digits only)"
            )
        if self.every and self.features == "inception" and not self.stats:
            raise ValueError(
                "FIDConfig.every > 0 needs FIDConfig.stats, a statistics file made by "
                "tools/fid_stats.py (e.g. --gin.FIDConfig.stats=\"'data/cifar10_train_fid.npz'\")"
            )
        if self.every < 0 or self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("FIDConfig needs every >= 0, num_samples >= 1 and batch_size >= 1")


class FIDEvaluator:
    """FID of consistency samples against reference statistics (docs/recipe.md section 1:
    50,000 samples against the CIFAR-10 train-set pool_3 statistics). Sampling and Inception
    both run sharded over every device; only the 2048-d features reach the host."""

    def __init__(
        self,
        sampler: Sampler,
        *,
        stats_path: str,
        num_samples: int,
        batch_size: int,
        inception_weights: str | None = None,
    ):
        from jcdm.fid import fid, inception

        self.sampler = sampler
        self.ref = fid.load_stats(stats_path)
        self.num_samples = num_samples
        self.batch_size = sampler.padded(batch_size)
        self._fid = fid
        self._features = fid.make_inception_fn(
            inception.load_params(inception_weights), sampler.mesh
        )

    def __call__(self, params, intermediate_sigmas: Sequence[float] = (), *, seed: int = 0):
        stats = self._fid.FeatureStats()
        done, i = 0, 0
        while done < self.num_samples:
            x = self.sampler.sample_global(
                params, self.batch_size, ("consistency", tuple(intermediate_sigmas)), seed + i
            )
            if x.shape[-1] == 1:  # grayscale data: Inception sees it as gray RGB
                x = jax.numpy.repeat(x, 3, axis=-1)
            take = min(self.batch_size, self.num_samples - done)
            stats.update(np.asarray(self._features(x))[:take])
            done, i = done + take, i + 1
        mu, sigma = stats.mean_cov()
        return float(self._fid.frechet_distance(mu, sigma, *self.ref))


class DigitsEvaluator:
    """`jcdm.fid.digits` metrics of consistency samples (one host array; the digits are small)."""

    def __init__(self, sampler: Sampler, *, num_samples: int):
        from jcdm.fid import digits

        if tuple(sampler.image_shape) != (digits.IMAGE_SIZE, digits.IMAGE_SIZE, 1):
            raise ValueError(
                f"FIDConfig.features='digits' needs the digits at {digits.IMAGE_SIZE}x"
                f"{digits.IMAGE_SIZE}x1 (make_train_iterator.dataset = 'digits', image_size = "
                f"{digits.IMAGE_SIZE}); this run's images are {sampler.image_shape}"
            )
        self.sampler, self.num_samples = sampler, num_samples
        self.metric = digits.DigitsEvaluator()

    def __call__(self, params, intermediate_sigmas: Sequence[float] = (), *, seed: int = 0):
        images = self.sampler.sample(params, self.num_samples, intermediate_sigmas, seed=seed)
        return self.metric(images)


def crossed(step: int, every: int, stride: int) -> bool:
    """True if the last call, which advanced the run by `stride` steps to `step`, crossed a
    multiple of `every` (`stride` = steps per compiled call; every = 0 never fires)."""
    return every > 0 and step // every > (step - stride) // every


class PeriodicEval:
    """Sample grids and FID at the configured intervals and at the final step."""

    def __init__(
        self,
        sampler: Sampler,
        reporter: reporting.Reporter,
        *,
        seed: int,
        stride: int = 1,
        cfg: EvalConfig | None = None,
        fid_cfg: FIDConfig | None = None,
    ):
        self.sampler, self.reporter, self.seed, self.stride = sampler, reporter, seed, stride
        self.cfg = cfg or EvalConfig()
        self.fid_cfg = fid_cfg or FIDConfig()
        self.fid_metrics: dict = {}  # the last FID, stored with every later checkpoint
        self._fid = None
        if self.fid_cfg.every and self.fid_cfg.features == "digits":
            self._fid = DigitsEvaluator(sampler, num_samples=self.fid_cfg.num_samples)
        elif self.fid_cfg.every:
            self._fid = FIDEvaluator(
                sampler,
                stats_path=self.fid_cfg.stats,
                num_samples=self.fid_cfg.num_samples,
                batch_size=self.fid_cfg.batch_size,
                inception_weights=self.fid_cfg.inception_weights,
            )

    @property
    def samplers(self) -> tuple[tuple[str, tuple[float, ...]], ...]:
        return (("1step", ()), ("2step", (self.cfg.two_step_sigma,)))

    def maybe_run(self, step: int, ema_params, *, final: bool) -> None:
        """Grids and FID if `step` is due (or the run's last step)."""
        if self.cfg.every and (final or crossed(step, self.cfg.every, self.stride)):
            self.grids(step, ema_params)
        if self._fid is not None and (final or crossed(step, self.fid_cfg.every, self.stride)):
            self.fid(step, ema_params)

    def grids(self, step: int, ema_params) -> None:
        n = self.cfg.num_grid_samples
        for tag, sigmas in self.samplers:
            self.reporter.save_grid(
                step, tag, self.sampler.sample(ema_params, n, sigmas, seed=self.seed)
            )
        if self.cfg.head_heun_steps and self.sampler.networks.head is not None:
            k = self.cfg.head_heun_steps
            images = self.sampler.sample_head(ema_params, n, k, seed=self.seed)
            self.reporter.save_grid(step, f"head_heun{k}", images)

    def fid(self, step: int, ema_params) -> dict:
        t0 = time.perf_counter()
        out = {}
        for tag, sigmas in self.samplers:
            value = self._fid(ema_params, sigmas, seed=self.seed + 1)
            if isinstance(value, dict):  # the digits metric: several numbers per sampler
                out.update({f"digits_{k}_{tag}": v for k, v in value.items()})
            else:
                out[f"fid_{tag}"] = value
        out["fid_seconds"] = time.perf_counter() - t0
        self.reporter.write_metrics(step, out)
        if "fid_1step" in out:
            log.info(
                "step %d: FID 1-step %.3f, 2-step %.3f", step, out["fid_1step"], out["fid_2step"]
            )
        else:
            log.info(
                "step %d: digits FD 1-step %.2f, 2-step %.2f; classes %d / %d of 10",
                step,
                out["digits_fd_1step"],
                out["digits_fd_2step"],
                out["digits_classes_1step"],
                out["digits_classes_2step"],
            )
        self.fid_metrics = out
        return out

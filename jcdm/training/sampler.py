"""Sampling from the EMA parameters on the mesh: consistency (1-, 2-, k-step) and the head's EDM
sampler, jitted with explicit shardings and gathered to every process."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jcdm.ict import objective, sampling
from jcdm.runtime import mesh as mesh_lib
from jcdm.training.step import Networks


class Sampler:
    """Compiled samplers keyed by (count, sigmas); batches are sharded over all devices."""

    def __init__(
        self,
        networks: Networks,
        cfg: objective.ICTConfig,
        mesh: jax.sharding.Mesh,
        ema_shardings,
        image_shape: Sequence[int],
        *,
        two_step_sigma: float = sampling.TWO_STEP_SIGMA,
    ):
        self.networks, self.cfg, self.mesh = networks, cfg, mesh
        self.ema_shardings = ema_shardings
        self.image_shape = tuple(image_shape)
        self.two_step_sigma = two_step_sigma
        self._compiled = {}

    def padded(self, n: int) -> int:
        """Sample counts round up to a multiple of the device count."""
        return -(-n // self.mesh.size) * self.mesh.size

    def _fn(self, n: int, key: tuple):
        if key in self._compiled:
            return self._compiled[key]
        nets, cfg = self.networks, self.cfg
        shape = (n, *self.image_shape)
        kind, arg = key[1], key[2]

        def run(params, rng):
            if kind == "consistency":
                f = lambda x, s: objective.consistency_fn(
                    nets.backbone_apply, params["backbone"], x, s, cfg
                )[0]
                return sampling.consistency_sample(
                    f,
                    rng,
                    shape,
                    intermediate_sigmas=arg,
                    sigma_min=cfg.sigma_min,
                    sigma_max=cfg.sigma_max,
                )

            def denoise(x, s):
                fx, temb, feat = objective.consistency_fn(
                    nets.backbone_apply, params["backbone"], x, s, cfg
                )
                return objective.head_denoiser(
                    nets.head_apply, params["head"], x, s, fx, feat, temb, cfg
                )

            return sampling.edm_heun_sample(
                denoise,
                rng,
                shape,
                num_steps=arg,
                sigma_min=cfg.sigma_min,
                sigma_max=cfg.sigma_max,
                rho=cfg.rho,
            )

        fn = jax.jit(
            run,
            in_shardings=(self.ema_shardings, mesh_lib.replicated(self.mesh)),
            out_shardings=mesh_lib.batch_sharding(self.mesh),
        )
        self._compiled[key] = fn
        return fn

    def _run(self, params, n: int, key: tuple, seed: int) -> np.ndarray:
        out = self.sample_global(params, n, key, seed)
        if jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
        return np.asarray(out)[:n]

    def sample_global(self, params, n: int, key: tuple, seed: int) -> jax.Array:
        """padded(n) samples as a global array sharded over the batch (nothing leaves devices)."""
        padded = self.padded(n)
        return self._fn(padded, (padded, *key))(params, jax.random.PRNGKey(seed))

    def sample(self, params, n: int, intermediate_sigmas: Sequence[float] = (), *, seed: int = 0):
        """n consistency samples in [-1, 1]-ish range ([n, H, W, C] on every process)."""
        return self._run(params, n, ("consistency", tuple(intermediate_sigmas)), seed)

    def sample_head(self, params, n: int, num_steps: int = 18, *, seed: int = 0) -> np.ndarray:
        """n samples from the score head as an EDM diffusion model (Heun, 2 num_steps - 1 NFE)."""
        if self.networks.head is None:
            raise ValueError("this run has no score head (ICTConfig.head = 'none')")
        return self._run(params, n, ("edm", num_steps), seed)

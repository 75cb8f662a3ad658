"""Samplers: multistep consistency sampling and the EDM Heun sampler for the score head.

`denoise(x, sigma)` callables map a batch and a per-sample sigma vector [B] to the clean estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jcdm.ict.schedules import RHO, SIGMA_MAX, SIGMA_MIN, karras_sigmas

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]

TWO_STEP_SIGMA = 0.821
"""iCT / ECT intermediate sigma for 2-step sampling; the reference project used 0.661."""


def consistency_sample(
    f: Denoiser,
    key: jax.Array,
    shape: Sequence[int],
    *,
    intermediate_sigmas: Sequence[float] = (),
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> jax.Array:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; docs/recipe.md section 1).

    x = f(sigma_max z, sigma_max); then for each t: x_t = x + sqrt(t^2 - sigma_min^2) z',
    x = f(x_t, t). One step with no intermediate sigmas; (0.821,) gives iCT's 2-step sampler.
    """
    keys = jax.random.split(key, len(intermediate_sigmas) + 1)
    batch = shape[0]
    x = sigma_max * jax.random.normal(keys[0], shape, jnp.float32)
    x = f(x, jnp.full((batch,), sigma_max, jnp.float32))
    for k, t in zip(keys[1:], intermediate_sigmas, strict=True):
        if not sigma_min < t <= sigma_max:
            raise ValueError(f"intermediate sigma {t} must lie in ({sigma_min}, {sigma_max}]")
        z = jax.random.normal(k, shape, jnp.float32)
        x_t = x + jnp.sqrt(t**2 - sigma_min**2) * z
        x = f(x_t, jnp.full((batch,), t, jnp.float32))
    return x


def edm_heun_sample(
    denoise: Denoiser,
    key: jax.Array,
    shape: Sequence[int],
    *,
    num_steps: int = 18,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> jax.Array:
    """Deterministic EDM sampler (Karras et al. 2022, Algorithm 1 with S_churn = 0).

    Integrates dx/dsigma = (x - D(x, sigma)) / sigma from sigma_max down the Karras grid with
    Heun's second-order correction, then a final Euler step to sigma = 0 (2 num_steps - 1 NFE).
    """
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)[::-1]
    sigmas = jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])
    batch = shape[0]
    x = sigmas[0] * jax.random.normal(key, shape, jnp.float32)

    def body(i, x):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, jnp.full((batch,), s))) / s
        x_next = x + (s_next - s) * d

        def heun(x_next):
            d2 = (x_next - denoise(x_next, jnp.full((batch,), s_next))) / s_next
            return x + (s_next - s) * 0.5 * (d + d2)

        return jax.lax.cond(s_next > 0, heun, lambda v: v, x_next)

    return jax.lax.fori_loop(0, num_steps, body, x)

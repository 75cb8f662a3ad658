"""Loss terms and weights (docs/recipe.md sections 1-3).

All functions take and return per-sample values ([B]) unless stated; the objective averages.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jcdm.ict.parameterization import SIGMA_DATA

HUBER_C_PER_DIM = 0.00054
REFERENCE_PER_PIXEL_C = 0.003


def default_huber_c(dim: int) -> float:
    """iCT's c = 0.00054 sqrt(d) (d = 3072 for CIFAR-10 gives c ~= 0.0299)."""
    return HUBER_C_PER_DIM * math.sqrt(dim)


def pseudo_huber(a: jax.Array, b: jax.Array, c: float | None = None) -> jax.Array:
    """Pseudo-Huber on each sample's whole-image L2 distance: sqrt(||a - b||^2 + c^2) - c.

    iCT (Song & Dhariwal 2023, section 3.3). `c` defaults to 0.00054 sqrt(d), d = H*W*C.
    """
    dim = math.prod(a.shape[1:])
    c = default_huber_c(dim) if c is None else c
    diff = (a - b).astype(jnp.float32).reshape(a.shape[0], -1)
    return jnp.sqrt(jnp.sum(diff**2, axis=-1) + c**2) - c


def pseudo_huber_per_pixel(
    a: jax.Array, b: jax.Array, c: float = REFERENCE_PER_PIXEL_C
) -> jax.Array:
    """The reference project's departure (docs/recipe.md section 3): pseudo-Huber per element with
    c = 0.003, averaged over the image. Kept selectable; not the default."""
    diff = (a - b).astype(jnp.float32).reshape(a.shape[0], -1)
    return jnp.mean(jnp.sqrt(diff**2 + c**2) - c, axis=-1)


def consistency_weight(sigma_lo: jax.Array, sigma_hi: jax.Array) -> jax.Array:
    """lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) (iCT section 3.4)."""
    return 1.0 / (sigma_hi - sigma_lo)


def edm_weight(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """EDM loss weight w(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def weighted_mse(d: jax.Array, x: jax.Array, weight: jax.Array) -> jax.Array:
    """w(sigma) * ||D - x||^2, averaged over the image axes (per sample)."""
    err = (d - x).astype(jnp.float32).reshape(d.shape[0], -1)
    return weight * jnp.mean(err**2, axis=-1)


def ema_decay_at(step, decay: float, warmup_steps: int = 0) -> jax.Array:
    """The EMA decay of update `step` (0-based: the update after which `step + 1` have been made):
    0 for the first `warmup_steps` updates, so the average restarts from the parameters after
    update `warmup_steps`, then `decay`.

    The reference's EMA (utils/ema/default_ema.py L43-46, update_after_step = 1) uses decay 0
    while max(n - 2, 0) <= 0, n = the optimizer's gradient_step after the update
    (framework/diffusion/consistency_framework.py L297-303): its first 2 updates, i.e.
    warmup_steps = 2 (docs/recipe.md section 3). warmup_steps = 0 is the plain EMA of iCT.
    """
    return jnp.where(jnp.asarray(step) < warmup_steps, 0.0, decay).astype(jnp.float32)


def ema_update(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf (docs/recipe.md section 1:
    decay 0.99993)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)

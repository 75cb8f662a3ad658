"""RAdam (Liu et al. 2020) and the EMA as one elementwise pass (docs/recipe.md section 1).

The same arithmetic as `optax.radam` followed by `jcdm.ict.losses.ema_update`, written so that
the per-element work of one step (both moments, the rectified direction, the parameter update,
the EMA and the non-finite guard) is a single expression over arrays of any shape: applied to
all parameters packed into one buffer, XLA emits one fused kernel instead of a chain per leaf.
The step's scalars (bias corrections, the rectification term) are computed once per step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RAdamScalars(NamedTuple):
    """The per-step scalars of RAdam at update number t = count + 1 (paper Algorithm 2)."""

    bias1: jax.Array  # 1 - b1^t
    bias2: jax.Array  # 1 - b2^t
    rect: jax.Array  # r_t, the variance rectification term (used when rho_t >= threshold)
    rectified: jax.Array  # bool: rho_t >= threshold, i.e. the adaptive step is tractable


def radam_scalars(
    count_inc: jax.Array, *, b1: float, b2: float, threshold: float = 5.0
) -> RAdamScalars:
    """rho_inf = 2 / (1 - b2) - 1, rho_t = rho_inf - 2 t b2^t / (1 - b2^t) and
    r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t)).

    `threshold` 5 is optax's (the paper's Algorithm 2 uses 4; optax's value is what jcdm has
    always trained with).
    """
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    b2t = b2**count_inc
    rho = rho_inf - 2 * count_inc * b2t / (1 - b2t)
    rect = jnp.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))
    return RAdamScalars(1 - b1**count_inc, 1 - b2t, rect, rho >= threshold)


def radam_ema_step(
    g: jax.Array,
    p: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    ema: jax.Array,
    *,
    s: RAdamScalars,
    learning_rate: float,
    b1: float,
    b2: float,
    eps: float,
    ema_decay: jax.Array,
    keep: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One RAdam update of parameters `p` from gradient `g`, then the EMA of the new parameters.

        mu' = b1 mu + (1 - b1) g               nu' = b2 nu + (1 - b2) g^2
        d   = r_t (mu' / bias1) / (sqrt(nu' / bias2) + eps)   if rectified, else mu' / bias1
        p'  = p - lr d                         ema' = decay ema + (1 - decay) p'

    `keep` (a bool scalar) returns the inputs unchanged instead: the non-finite guard, folded
    into the same pass rather than a select over the whole state afterwards.
    """
    mu_new = (1 - b1) * g + b1 * mu
    nu_new = (1 - b2) * (g * g) + b2 * nu
    mu_hat = mu_new / s.bias1.astype(mu.dtype)
    nu_hat = nu_new / s.bias2.astype(nu.dtype)
    adaptive = s.rect.astype(mu.dtype) * mu_hat / (jnp.sqrt(nu_hat) + eps)
    direction = jnp.where(s.rectified, adaptive, mu_hat)
    p_new = (p + (-learning_rate) * direction).astype(p.dtype)
    ema_new = ema_decay * ema + (1.0 - ema_decay) * p_new
    pick = lambda new, old: jnp.where(keep, old, new)
    return pick(p_new, p), pick(mu_new, mu), pick(nu_new, nu), pick(ema_new, ema)

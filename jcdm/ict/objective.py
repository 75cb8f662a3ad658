"""The joint objective: iCT consistency loss plus the score head's denoising loss.

docs/recipe.md sections 1 and 2. The networks enter as two apply functions, so this module holds
the math alone; `jcdm.training.train` binds them to Flax modules, parameters and a mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jcdm.ict import losses, parameterization, schedules

HEAD_MODES = ("joint", "vanilla", "none")
DISTANCES = ("pseudo_huber", "pseudo_huber_per_pixel")
HEAD_PRECONDS = ("edm", "cm")

# backbone(params, x_in, c_noise, dropout_key) -> (F, temb, feat); dropout_key None = eval mode.
BackboneApply = Callable[[Any, jax.Array, jax.Array, jax.Array | None], tuple]
# head(params, x_in, c_noise, f_in, feat, temb, dropout_key) -> F_head.
HeadApply = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class ICTConfig:
    """The method's hyper-parameters; defaults are the paper's CIFAR-10 recipe (docs/recipe.md)."""

    sigma_min: float = schedules.SIGMA_MIN
    sigma_max: float = schedules.SIGMA_MAX
    rho: float = schedules.RHO
    sigma_data: float = parameterization.SIGMA_DATA
    p_mean: float = schedules.P_MEAN
    p_std: float = schedules.P_STD
    s0: int = schedules.S0
    s1: int = schedules.S1
    distance: str = "pseudo_huber"  # "pseudo_huber_per_pixel" = the reference's departure
    huber_c: float | None = None  # None: 0.00054 sqrt(d) per sample; 0.003 for per-pixel
    head: str = "joint"  # "joint" | "vanilla" | "none"
    joint_weight: float = 0.3
    head_precond: str = "cm"  # the reference's consistency-style scalings; "edm": EDM's

    def __post_init__(self):
        for name, value, allowed in (
            ("head", self.head, HEAD_MODES),
            ("distance", self.distance, DISTANCES),
            ("head_precond", self.head_precond, HEAD_PRECONDS),
        ):
            if value not in allowed:
                raise ValueError(f"ICTConfig.{name}={value!r}; choose one of {allowed}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError("ICTConfig needs 0 < sigma_min < sigma_max")


def consistency_fn(
    backbone: BackboneApply, params, x, sigma, cfg: ICTConfig, dropout_key=None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """f(x, sigma) = c_skip x + c_out F(c_in x, c_noise), plus the backbone temb and features."""
    c_skip, c_out, c_in = parameterization.consistency_scalings(
        sigma, cfg.sigma_min, cfg.sigma_data
    )
    x_in = parameterization.expand(c_in, x.ndim) * x
    raw, temb, feat = backbone(params, x_in, parameterization.c_noise(sigma), dropout_key)
    return parameterization.precondition(x, raw, c_skip, c_out), temb, feat


def head_denoiser(
    head: HeadApply, params, x, sigma, f, feat, temb, cfg: ICTConfig, dropout_key=None
) -> jax.Array:
    """The score head's denoiser D(x_sigma, sigma) (docs/recipe.md section 2).

    Inputs: c_in x, c_noise, c_in * stop_gradient(f(x, sigma)), and the backbone's feature map and
    time embedding (layer-normalised inside the head). head_precond "cm" (default): the
    consistency-style scalings with c_skip(sigma_min) = 1, as the reference's
    ``ScoreDistillPrecond`` (model/unetpp.py L899-902); "edm": EDM's (Karras et al. 2022,
    Table 1), which differ by sigma_min = 0.002 in c_skip / c_out.
    """
    if cfg.head_precond == "edm":
        c_skip, c_out, c_in = parameterization.edm_scalings(sigma, cfg.sigma_data)
    else:
        c_skip, c_out, c_in = parameterization.consistency_scalings(
            sigma, cfg.sigma_min, cfg.sigma_data
        )
    c_in = parameterization.expand(c_in, x.ndim)
    f_in = c_in * jax.lax.stop_gradient(f)
    raw = head(params, c_in * x, parameterization.c_noise(sigma), f_in, feat, temb, dropout_key)
    return parameterization.precondition(x, raw, c_skip, c_out)


def distance(a, b, cfg: ICTConfig) -> jax.Array:
    if cfg.distance == "pseudo_huber":
        return losses.pseudo_huber(a, b, cfg.huber_c)
    c = losses.REFERENCE_PER_PIXEL_C if cfg.huber_c is None else cfg.huber_c
    return losses.pseudo_huber_per_pixel(a, b, c)


def joint_loss(
    params: dict,
    x: jax.Array,
    key: jax.Array,
    step,
    *,
    backbone: BackboneApply,
    head: HeadApply | None,
    cfg: ICTConfig,
    total_steps: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss = mean lambda(sigma_i) d(f(x + sigma_{i+1} z), sg f(x + sigma_i z))
    + joint_weight * mean w(sigma_{i+1}) ||D(x + sigma_{i+1} z) - x||^2.

    `params` = {"backbone": ..., "head": ...} ("head" absent when cfg.head == "none"). The teacher
    is the stop-gradient of the student's own parameters, sees the same noise z and the same
    dropout key; the head reuses the student's forward pass at sigma_{i+1}.
    """
    k_sigma, k_noise, k_drop, k_head = jax.random.split(key, 4)
    n = schedules.num_scales(step, total_steps, cfg.s0, cfg.s1)
    grid = dict(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
    sigma_lo, sigma_hi = schedules.sample_sigma_pairs(
        k_sigma, n, x.shape[0], max_n=cfg.s1 + 1, p_mean=cfg.p_mean, p_std=cfg.p_std, **grid
    )
    z = jax.random.normal(k_noise, x.shape, jnp.float32)
    x_hi = x + parameterization.expand(sigma_hi, x.ndim) * z
    x_lo = x + parameterization.expand(sigma_lo, x.ndim) * z

    f_student, temb, feat = consistency_fn(
        backbone, params["backbone"], x_hi, sigma_hi, cfg, k_drop
    )
    teacher_params = jax.lax.stop_gradient(params["backbone"])
    f_teacher, _, _ = consistency_fn(backbone, teacher_params, x_lo, sigma_lo, cfg, k_drop)
    f_teacher = jax.lax.stop_gradient(f_teacher)

    weight = losses.consistency_weight(sigma_lo, sigma_hi)
    loss_ct = jnp.mean(weight * distance(f_student, f_teacher, cfg))

    metrics = {
        "loss_ct": loss_ct,
        "num_scales": n,
        "sigma_mean": jnp.mean(sigma_hi),
    }
    loss = loss_ct
    if cfg.head != "none":
        if cfg.head == "vanilla":
            feat, temb = jax.lax.stop_gradient((feat, temb))
        d = head_denoiser(head, params["head"], x_hi, sigma_hi, f_student, feat, temb, cfg, k_head)
        loss_dsm = jnp.mean(losses.weighted_mse(d, x, losses.edm_weight(sigma_hi, cfg.sigma_data)))
        metrics["loss_dsm"] = loss_dsm
        loss = loss + cfg.joint_weight * loss_dsm
    metrics["loss"] = loss
    return loss, metrics

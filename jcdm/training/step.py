"""The training state and the jitted update: binds the objective's math to Flax modules.

One call of `train_step` = student and teacher forward passes, the head's denoising loss, RAdam,
the EMA update and metrics. It is built once per run with explicit in/out shardings on the mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax

from jcdm.ict import objective
from jcdm.ict.losses import ema_decay_at
from jcdm.training import update as update_lib


@gin.configurable(module="jcdm")
@dataclasses.dataclass(frozen=True)
class EMAConfig:
    """The evaluation EMA's warm-up: decay 0 for the first `warmup_steps` updates (the average
    restarts from the parameters after them), then `train.ema_decay`. 0 = iCT's plain EMA; the
    reference uses 2 (`jcdm.ict.losses.ema_decay_at`, docs/recipe.md section 3)."""

    warmup_steps: int = 0

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"EMAConfig.warmup_steps must be >= 0, got {self.warmup_steps}")


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint must hold to resume bit-exactly (the data iterator aside)."""

    step: jax.Array  # int32 scalar: updates applied so far
    params: dict  # {"backbone": ..., "head": ...}
    opt_state: Any
    ema_params: dict
    rng: jax.Array  # uint32[2] base key; step keys are fold_in(rng, step)
    nonfinite_step: jax.Array  # int32: -1, or the first step whose loss/gradient was not finite


@dataclasses.dataclass(frozen=True)
class Networks:
    """The Flax modules and the apply functions the objective expects."""

    backbone: nn.Module
    head: nn.Module | None

    def backbone_apply(self, params, x_in, c_noise, dropout_key):
        train = dropout_key is not None
        rngs = {"dropout": dropout_key} if train else {}
        return self.backbone.apply({"params": params}, x_in, c_noise, train=train, rngs=rngs)

    def head_apply(self, params, x_in, c_noise, f_in, feat, temb, dropout_key):
        train = dropout_key is not None
        rngs = {"dropout": dropout_key} if train else {}
        return self.head.apply(
            {"params": params}, x_in, c_noise, f_in, feat, temb, train=train, rngs=rngs
        )

    def init_params(self, key: jax.Array, image_shape: tuple[int, ...]) -> dict:
        k_b, k_h = jax.random.split(key)
        x = jnp.zeros((1, *image_shape), jnp.float32)
        c = jnp.zeros((1,), jnp.float32)
        variables = self.backbone.init({"params": k_b}, x, c, train=False)
        params = {"backbone": variables["params"]}
        if self.head is not None:
            _, temb, feat = self.backbone.apply(variables, x, c, train=False)
            params["head"] = self.head.init({"params": k_h}, x, c, x, feat, temb, train=False)[
                "params"
            ]
        return params


def init_state(seed: jax.Array, networks: Networks, tx, image_shape) -> TrainState:
    """A fresh state from an integer seed.

    Parameter init draws one random tensor per layer with an "unsafe_rbg" key: XLA compiles
    threefry slowly (about 1.4 s per draw on this project's CPU machines; minutes for NCSN++),
    RngBitGenerator quickly. Init runs once, unsharded, so rbg's dependence on sharding does not
    matter; the training key (noise, sigmas, dropout) stays threefry, whose values do not depend
    on the mesh.
    """
    k_params = jax.random.key(seed, impl="unsafe_rbg")
    k_train = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    params = networks.init_params(k_params, image_shape)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        rng=k_train,
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def make_train_step(
    networks: Networks,
    tx: update_lib.FusedRAdam | update_lib.PerLeaf | optax.GradientTransformation,
    cfg: objective.ICTConfig,
    *,
    total_steps: int,
    ema_decay: float,
    ema_warmup_steps: int | None = None,
    packable: Any = None,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    """Return the un-jitted update: (state, images [B,H,W,C] in [-1, 1]) -> (state, metrics).

    A non-finite loss or gradient leaves the state untouched, records the step in
    `nonfinite_step` and freezes every later update; the host loop checks that field before each
    save and stops, so no broken state is ever checkpointed. `ema_warmup_steps` None: the gin-bound
    `EMAConfig.warmup_steps`. `tx`: see `jcdm.training.update.as_update`; `packable`: which
    parameter leaves the fused optimizer may pack (`update.replicated_leaves`; None = all).
    """
    opt = update_lib.as_update(tx)
    if ema_warmup_steps is None:
        ema_warmup_steps = EMAConfig().warmup_steps
    head = networks.head_apply if networks.head is not None else None

    def loss_fn(params, x, key, step):
        loss, metrics = objective.joint_loss(
            params,
            x,
            key,
            step,
            backbone=networks.backbone_apply,
            head=head,
            cfg=cfg,
            total_steps=total_steps,
        )
        return loss, metrics

    def train_step(state: TrainState, x: jax.Array):
        key = jax.random.fold_in(state.rng, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, x, key, state.step)
        frozen = state.nonfinite_step >= 0
        u = opt.step(
            grads,
            state.params,
            state.opt_state,
            state.ema_params,
            ema_decay=ema_decay_at(state.step, ema_decay, ema_warmup_steps),
            frozen=frozen,
            loss_finite=jnp.isfinite(metrics["loss"]),
            packable=packable,
        )
        # A kept (non-finite or frozen) step changes nothing but the record of the first bad one.
        new = state.replace(
            step=jnp.where(u.kept, state.step, state.step + 1),
            params=u.params,
            opt_state=u.opt_state,
            ema_params=u.ema_params,
            nonfinite_step=jnp.where(u.kept & ~frozen, state.step, state.nonfinite_step),
        )
        return new, dict(metrics, grad_norm=u.grad_norm)

    return train_step


def make_multi_step(train_step, steps_per_call: int, *, unroll: bool = False):
    """Run `steps_per_call` updates in one compiled call (a scan over stacked batches).

    Amortises dispatch and host round trips; the update sequence is identical to calling
    `train_step` that many times. Metrics are those of the last step. `unroll` lays the steps
    out one after another instead of in a while loop: XLA:CPU runs the convolutions of a loop
    body on a slow generic path (WORKSPACE_NOTES.md "Performance"), at the price of a program
    (and compile time) `steps_per_call` times larger.
    """
    if steps_per_call == 1:
        return train_step

    def multi(state, xs):
        state, metrics = jax.lax.scan(train_step, state, xs, unroll=steps_per_call if unroll else 1)
        return state, jax.tree.map(lambda m: m[-1], metrics)

    return multi

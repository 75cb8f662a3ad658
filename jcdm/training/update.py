"""The optimizer half of a train step: RAdam, the EMA and the non-finite guard over the state.

Two implementations with the same numbers (to float32 rounding) and the same state layout, so a
checkpoint written by one restores into the other:

- `FusedRAdam` (`make_optimizer.impl = 'fused'`; 'auto' picks it off CPU): every parameter
  leaf that the mesh replicates is packed into one flat buffer per dtype, and the gradient norm,
  both moments, the update, the EMA and the guard run as one elementwise pass over it
  (`jcdm.ict.optim`). Per-leaf work was ~1,900 small kernels per step on the H200 (421 leaves;
  docs/performance.md). Leaves that FSDP shards keep their own sharding and get the same
  arithmetic leaf by leaf: packing them would gather them.
- `PerLeaf` (`impl = 'optax'`; 'auto' picks it on a CPU): any optax transformation,
  `optax.apply_updates`, the EMA leaf by leaf and a select over the whole state: the reference
  the fused path is tested against.

The packing costs a copy of gradients, parameters, moments and EMA into the buffers and back
(about 1.6 GB at the CIFAR config, bandwidth-bound); the state itself keeps
optax's tree layout for checkpoints, samplers and tools.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcdm.ict import optim
from jcdm.ict.losses import ema_update

IMPLS = ("fused", "optax")


class Update(NamedTuple):
    """What one optimizer step returns; with `kept` the state arrays are the inputs unchanged."""

    params: Any
    opt_state: Any
    ema_params: Any
    grad_norm: jax.Array
    kept: jax.Array  # bool: the guard left the state as it was


@dataclasses.dataclass(frozen=True)
class PerLeaf:
    """An optax transformation applied leaf by leaf, then the EMA and a select over the state."""

    tx: optax.GradientTransformation

    def init(self, params) -> Any:
        return self.tx.init(params)

    def step(self, grads, params, opt_state, ema, *, ema_decay, frozen, loss_finite, **_):
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = self.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_ema = ema_update(ema, new_params, ema_decay)
        kept = frozen | ~(loss_finite & jnp.isfinite(grad_norm))
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(kept, b, a), new, old)
        return Update(
            pick(new_params, params), pick(new_opt, opt_state), pick(new_ema, ema), grad_norm, kept
        )


@dataclasses.dataclass(frozen=True)
class FusedRAdam:
    """`optax.radam(learning_rate, b1, b2, eps)` + EMA + guard in one pass (module docstring)."""

    learning_rate: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def init(self, params) -> Any:
        # optax's layout ((ScaleByAdamState(count, mu, nu), EmptyState())): checkpoints written
        # with impl='optax' restore here and back.
        return optax.radam(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps).init(params)

    def step(self, grads, params, opt_state, ema, *, ema_decay, frozen, loss_finite, packable):
        """`packable`: a tree of bools like `params` (None = all leaves), True for the leaves to
        pack into the shared buffer (those the mesh replicates)."""
        radam, rest = opt_state
        leaves, treedef = jax.tree.flatten(params)
        columns = [
            leaves,
            treedef.flatten_up_to(grads),
            treedef.flatten_up_to(radam.mu),
            treedef.flatten_up_to(radam.nu),
            treedef.flatten_up_to(ema),
        ]
        mask = [True] * len(leaves) if packable is None else treedef.flatten_up_to(packable)
        groups = _groups(leaves, mask)
        # Each group (one dtype's packed leaves, or one unpacked leaf) as flat arrays.
        packed = [[_pack(col, idx) for col in columns] for idx in groups]

        sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for _, g, *_ in packed)
        grad_norm = jnp.sqrt(sq)
        kept = frozen | ~(loss_finite & jnp.isfinite(grad_norm))
        count_inc = optax.safe_increment(radam.count)  # as optax.radam counts
        s = optim.radam_scalars(count_inc, b1=self.b1, b2=self.b2)
        out = [[None] * len(leaves) for _ in range(4)]  # params, mu, nu, ema
        for idx, (p, g, mu, nu, e) in zip(groups, packed, strict=True):
            new = optim.radam_ema_step(
                g,
                p,
                mu,
                nu,
                e,
                s=s,
                learning_rate=self.learning_rate,
                b1=self.b1,
                b2=self.b2,
                eps=self.eps,
                ema_decay=ema_decay,
                keep=kept,
            )
            for column, flat in zip(out, new, strict=True):
                _unpack(flat, idx, leaves, column)
        new_p, new_mu, new_nu, new_e = (treedef.unflatten(c) for c in out)
        count = jnp.where(kept, radam.count, count_inc)
        new_radam = radam._replace(count=count, mu=new_mu, nu=new_nu)
        return Update(new_p, (new_radam, rest), new_e, grad_norm, kept)


def _groups(leaves: list, mask: list[bool]) -> list[list[int]]:
    """Leaf indices per buffer: the packable leaves of each dtype together, every other leaf
    alone (in leaf order, so the layout is deterministic)."""
    by_dtype: dict[Any, list[int]] = {}
    alone = []
    for i, (leaf, pack) in enumerate(zip(leaves, mask, strict=True)):
        if pack:
            by_dtype.setdefault(jnp.dtype(leaf.dtype), []).append(i)
        else:
            alone.append([i])
    return [*by_dtype.values(), *alone]


def _pack(column: list, idx: list[int]) -> jax.Array:
    if len(idx) == 1:
        return column[idx[0]]
    return jnp.concatenate([jnp.ravel(column[i]) for i in idx])


def _unpack(flat: jax.Array, idx: list[int], like: list, out: list) -> None:
    if len(idx) == 1:
        out[idx[0]] = flat
        return
    offsets = np.cumsum([0] + [int(np.prod(like[i].shape)) for i in idx])
    for j, i in enumerate(idx):
        out[i] = flat[offsets[j] : offsets[j + 1]].reshape(like[i].shape)


def as_update(tx) -> FusedRAdam | PerLeaf:
    """An optimizer for `make_train_step`: FusedRAdam/PerLeaf as they are, any other optax
    transformation leaf by leaf."""
    if isinstance(tx, FusedRAdam | PerLeaf):
        return tx
    if isinstance(tx, optax.GradientTransformation):
        return PerLeaf(tx)
    raise TypeError(f"expected FusedRAdam, PerLeaf or an optax transformation, got {type(tx)}")


def replicated_leaves(param_shardings) -> Any:
    """A tree of bools like the parameters: True where the sharding replicates the leaf (every
    PartitionSpec entry None), i.e. where packing needs no communication."""
    return jax.tree.map(lambda s: all(a is None for a in s.spec), param_shardings)

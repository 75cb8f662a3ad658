"""Networks of jcdm: the NCSN++ consistency backbone and the score head (docs/recipe.md
sections 1-2).

Both classes are gin configurables under the ``jcdm.models`` module, so a .gin file can say
``NCSNpp.nf = 128`` or ``ScoreHead.num_res_blocks = 1``; bindings apply to every construction,
explicit keyword arguments win.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcdm.models.ncsnpp import NCSNpp
from jcdm.models.score_head import ScoreHead

__all__ = ["NCSNpp", "ScoreHead", "count_params", "tree_size"]


def tree_size(tree: Any) -> int:
    """Total number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(leaf.size for leaf in jax.tree.leaves(tree)))


def count_params(
    module: nn.Module,
    x_shape: Sequence[int],
    *extra_shapes: Sequence[int],
    dtype: Any = jnp.float32,
) -> int:
    """Number of trainable parameters of ``module``, via ``jax.eval_shape`` (nothing allocated).

    The module is called as ``module(x, c_noise, *extra, train=False)`` with x of ``x_shape``,
    c_noise of shape [B] and one array per ``extra_shapes`` entry, e.g.
    ``count_params(NCSNpp(), (1, 32, 32, 3))`` or, for the score head,
    ``count_params(ScoreHead(), (1, 32, 32, 3), (1, 32, 32, 3), (1, 32, 32, 256), (1, 512))``.
    The frozen Fourier-feature vector counts, as in the reference's 56,395,651 for NCSN++.
    """
    args = [jax.ShapeDtypeStruct(tuple(x_shape), dtype)]
    args.append(jax.ShapeDtypeStruct((x_shape[0],), jnp.float32))
    args += [jax.ShapeDtypeStruct(tuple(s), dtype) for s in extra_shapes]

    def init(key, *a):
        return module.init(key, *a, train=False)

    variables = jax.eval_shape(init, jax.random.key(0), *args)
    return tree_size(variables["params"])

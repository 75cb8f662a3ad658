"""The attention switch (`AttnBlock.impl`, gin ATTN_IMPL): jax.nn.dot_product_attention computes
the same block as the einsums, with the same parameters ('cudnn' needs a GPU: bench/device_run.sh
checks it there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcdm.models import NCSNpp
from jcdm.models.layers import AttnBlock


def _x(shape=(2, 8, 8, 16), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("dtype,rtol", [("float32", 2e-5), ("bfloat16", 3e-2)])
def test_dot_product_attention_equals_einsum(dtype, rtol):
    x = _x()
    ref = AttnBlock(init_scale=1.0, dtype=dtype)
    params = ref.init(jax.random.PRNGKey(1), x)
    got = AttnBlock(init_scale=1.0, impl="xla", dtype=dtype).apply(params, x)
    want = ref.apply(params, x)
    assert got.dtype == want.dtype
    h_got, h_want = np.float32(got - x), np.float32(want - x)  # the attention branch alone
    assert np.abs(h_want).max() > 0.1
    np.testing.assert_allclose(h_got, h_want, rtol=rtol, atol=rtol * np.abs(h_want).max())


def test_network_with_xla_attention_matches_and_shares_parameters():
    kw = dict(nf=16, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,), image_size=8)
    x, c = _x((2, 8, 8, 3)), jnp.full((2,), 0.3)
    a, b = NCSNpp(**kw), NCSNpp(**kw, attn_impl="xla")
    params = a.init(jax.random.PRNGKey(0), x, c, train=False)
    assert jax.tree.structure(params) == jax.tree.structure(
        b.init(jax.random.PRNGKey(0), x, c, train=False)
    )
    # a non-zero output projection, so the attention blocks contribute
    params = jax.tree.map(lambda p: p + 0.05, params)
    np.testing.assert_allclose(
        b.apply(params, x, c, train=False)[0],
        a.apply(params, x, c, train=False)[0],
        rtol=1e-4,
        atol=1e-5,
    )


def test_unknown_attention_impl_names_the_setting():
    msg = r"one of \('einsum', 'xla', 'cudnn'\), got 'flash': set ATTN_IMPL"
    with pytest.raises(ValueError, match=msg):
        AttnBlock(impl="flash").init(jax.random.PRNGKey(0), _x())

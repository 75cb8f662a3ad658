"""Tests of jcdm.models: NCSN++ backbone, score head, FIR resampling (docs/recipe.md sections 1-2).

XLA:CPU compiles random-number ops and backward passes slowly (seconds each), so: big configs are
only traced (jax.eval_shape); the real ``init`` and the dropout checks share one jitted call on a
one-level MINI config; other forward passes use host-generated random weights; the head's
gradient path is checked on its traced graph.
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcdm.models import NCSNpp, ScoreHead, count_params, fir, tree_size

SMALL = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16)
B, S, C = 2, 16, 1


def _rand_params(tree, seed: int, std: float = 0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32), tree)


def _inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, S, S, C)), jnp.float32)
    f_in = jnp.asarray(rng.normal(size=(B, S, S, C)), jnp.float32)
    c_noise = jnp.asarray([-1.2, 0.7], jnp.float32)
    return x, c_noise, f_in


# ---------------------------------------------------------------- parameter counts (eval_shape)


def _abstract_init_apply(model, batch, *extra_shapes):
    """Parameter and output shapes of ``model`` (nothing is computed or allocated)."""
    args = [jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.float32)]
    args.append(jax.ShapeDtypeStruct((batch,), jnp.float32))
    args += [jax.ShapeDtypeStruct(s, jnp.float32) for s in extra_shapes]

    def init_apply(key, *a):
        variables = model.init(key, *a, train=False)
        return variables, model.apply(variables, *a, train=False)

    return jax.eval_shape(init_apply, jax.random.key(0), *args)


def test_ncsnpp_cifar_param_count_and_shapes():
    variables, (out, temb, feat) = _abstract_init_apply(NCSNpp(), 4)
    n = tree_size(variables["params"])
    print(f"NCSN++ CIFAR-10 parameters: {n:,}")
    assert abs(n - 56.40e6) / 56.40e6 < 0.005
    assert n == 56_395_651  # the reference NCSN++ (iCT / consistency_models_cifar10) count
    assert (out.shape, temb.shape, feat.shape) == ((4, 32, 32, 3), (4, 512), (4, 32, 32, 256))
    assert out.dtype == jnp.float32


def test_ncsnpp_deep_param_count():
    n = count_params(NCSNpp(num_res_blocks=8), (1, 32, 32, 3))
    print(f"NCSN++ iCT-deep parameters: {n:,}")
    assert abs(n - 97.61e6) / 97.61e6 < 0.001
    assert n == 97_610_627


def test_score_head_default_param_count_and_shape():
    shapes = ((2, 32, 32, 3), (2, 32, 32, 256), (2, 512))
    variables, out = _abstract_init_apply(ScoreHead(), 2, *shapes)
    n = tree_size(variables["params"])
    print(f"score head parameters: {n:,}")
    assert abs(n - 26.24e6) / 26.24e6 < 0.005
    assert n == 26_243_715  # the reference head (UNetppHead + ScoreDistillPrecond) count
    assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32


def test_variants_trace():
    # Non-default options must at least trace with consistent shapes.
    for kw in (
        dict(resblock_type="ddpm", progressive="residual", progressive_input="input_skip"),
        dict(progressive="output_skip", progressive_combine="cat", embedding_type="positional"),
    ):
        assert count_params(NCSNpp(**SMALL, out_channels=C, **kw), (B, S, S, C)) > 0, kw
    with pytest.raises(ValueError):
        count_params(NCSNpp(**SMALL, resblock_type="nope"), (B, S, S, C))


# ---------------------------------------------------------------- real forward passes
# The SMALL config (the fast-test / CPU-demo size) gets a full forward pass with host-random
# weights; real init, dropout and dtype checks use MINI (one level), which compiles faster.

MINI = dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), image_size=8)


def test_small_config_forward_and_eval_determinism():
    backbone = NCSNpp(**SMALL, out_channels=C, dropout=0.3)
    head = ScoreHead(**SMALL, out_channels=C)
    x, t, f_in = _inputs()
    feat0, temb0 = jnp.zeros((B, S, S, 16)), jnp.zeros((B, 64))
    shapes = jax.eval_shape(
        lambda k: (
            backbone.init(k, x, t, train=False),
            head.init(k, x, t, f_in, feat0, temb0, train=False),
        ),
        jax.random.key(0),
    )
    pb, ph = _rand_params(shapes[0], 0), _rand_params(shapes[1], 1)

    @jax.jit
    def run(key):  # train=False with a dropout rng supplied: the rng must be ignored
        out, temb, feat = backbone.apply(pb, x, t, train=False, rngs={"dropout": key})
        return out, temb, feat, head.apply(ph, x, t, f_in, feat, temb, train=False)

    out, temb, feat, head_out = jax.device_get(run(jax.random.key(1)))
    assert out.shape == (B, S, S, C) and out.dtype == np.float32
    assert temb.shape == (B, 4 * 16)
    assert feat.shape == (B, S, S, 16)
    assert head_out.shape == (B, S, S, C) and head_out.dtype == np.float32
    for a in (out, head_out):
        assert np.isfinite(a).all() and np.abs(a).max() > 1e-3
    np.testing.assert_array_equal(jax.device_get(run(jax.random.key(2))[0]), out)


@pytest.fixture(scope="module")
def mini():
    backbone = NCSNpp(**MINI, out_channels=C, dropout=0.3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, 8, 8, C)), jnp.float32)
    t = jnp.asarray([-1.2, 0.7], jnp.float32)
    shapes = jax.eval_shape(lambda k: backbone.init(k, x, t, train=False), jax.random.key(0))
    rand = _rand_params(shapes, 1)

    @jax.jit
    def run(init_key, dropout_key):
        real = backbone.init(init_key, x, t, train=False)
        both = jax.tree.map(lambda a, b: jnp.stack([a, b]), real, rand)
        # One vmapped forward (same dropout mask) for the real init and the random weights.
        outs = jax.vmap(
            lambda p: backbone.apply(p, x, t, train=True, rngs={"dropout": dropout_key})
        )(both)
        return real, outs

    # 'unsafe_rbg' keys: XLA:CPU compiles RngBitGenerator much faster than threefry.
    init_key = jax.random.key(0, impl="unsafe_rbg")
    key_a, key_b = jax.random.split(jax.random.key(1, impl="unsafe_rbg"))
    runs = [jax.device_get(run(init_key, k)) for k in (key_a, key_a, key_b)]
    return dict(runs=runs, rand=rand, x=x, t=t, key_a=key_a)


def test_init_scale_zero_gives_zero_output(mini):
    # init_scale = 0: the output conv is exactly zero, so F = 0 and f(x, sigma) = c_skip x at
    # initialisation (dropout on, to show it cannot leak through either).
    real, (out, _, feat) = mini["runs"][0]
    params = real["params"]
    last = max(int(k.split("_")[1]) for k in params if k.startswith("Conv_"))
    assert np.all(np.asarray(params[f"Conv_{last}"]["kernel"]) == 0.0)
    assert np.all(out[0] == 0.0)
    assert np.abs(feat[0]).max() > 0.0  # ...while the features are not trivial
    assert np.abs(out[1]).max() > 1e-3  # and nonzero weights give a nonzero output
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(real))


def test_count_params_matches_real_init(mini):
    real = mini["runs"][0][0]
    n = count_params(NCSNpp(**MINI, out_channels=C), (B, 8, 8, C))
    assert n == tree_size(real["params"]) > 0
    head = ScoreHead(**MINI, out_channels=C)
    assert count_params(head, (B, 8, 8, C), (B, 8, 8, C), (B, 8, 8, 8), (B, 32)) > 0


def test_dropout_rng_semantics(mini):
    a1, a2, b = (r[1][0][1] for r in mini["runs"])  # train=True outputs, random weights
    np.testing.assert_array_equal(a1, a2)  # same rng -> same output
    assert np.abs(a1 - b).max() > 1e-4  # different rng -> different output


def test_bfloat16_compute_keeps_float32_params(mini):
    model = NCSNpp(**MINI, out_channels=C, dropout=0.3, dtype=jnp.bfloat16)
    x, t, key = mini["x"], mini["t"], mini["key_a"]
    out, temb, feat = jax.jit(lambda p: model.apply(p, x, t, train=True, rngs={"dropout": key}))(
        mini["rand"]
    )
    assert out.dtype == jnp.float32 and feat.dtype == jnp.bfloat16 and temb.dtype == jnp.bfloat16
    ref = mini["runs"][0][1][0][1]  # float32 compute, same weights and dropout mask
    rel = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
    assert rel < 0.05, rel


def test_head_never_detaches_its_inputs():
    # The caller chooses joint vs vanilla training, so the head itself must let gradients reach
    # feat and temb. Checked on the traced graph (compiling a backward pass costs seconds): the
    # only stop_gradients allowed are softmax's max-subtraction, on [..., 1]-shaped maxima.
    head = ScoreHead(**SMALL, out_channels=C)
    x, t, f_in = _inputs()
    feat, temb = jnp.zeros((B, S, S, 16)), jnp.zeros((B, 64))
    params = jax.eval_shape(
        lambda k: head.init(k, x, t, f_in, feat, temb, train=False), jax.random.key(0)
    )
    jaxpr = jax.make_jaxpr(lambda p, f, e: head.apply(p, x, t, f_in, f, e, train=False))(
        params, feat, temb
    )
    stops = [ln.strip() for ln in str(jaxpr).splitlines() if "= stop_gradient" in ln]
    assert stops, "expected softmax's stop_gradient in the attention layers"
    assert all(ln.split("=")[0].strip().endswith(",1]") for ln in stops), stops


def test_gin_binding_applies():
    gin.clear_config()
    try:
        gin.parse_config(["NCSNpp.nf = 32", "ScoreHead.num_res_blocks = 2"])
        assert NCSNpp().nf == 32 and NCSNpp(nf=8).nf == 8
        assert ScoreHead().num_res_blocks == 2
    finally:
        gin.clear_config()
    assert NCSNpp().nf == 128


# ---------------------------------------------------------------- FIR resampling


def _np_upfirdn(x, k2, up, down, pad0, pad1):
    """StyleGAN2 upfirdn2d by definition on [N, H, W, C]: zero-insert, pad, convolve, subsample."""
    n, h, w, c = x.shape
    z = np.zeros((n, h * up, w * up, c))
    z[:, ::up, ::up] = x
    z = np.pad(z, ((0, 0), (pad0, pad1), (pad0, pad1), (0, 0)))
    kh, kw = k2.shape
    oh, ow = z.shape[1] - kh + 1, z.shape[2] - kw + 1
    out = np.zeros((n, oh, ow, c))
    for a in range(kh):
        for b in range(kw):  # true convolution: kernel flipped
            out += k2[kh - 1 - a, kw - 1 - b] * z[:, a : a + oh, b : b + ow]
    return out[:, ::down, ::down]


def test_fir_hand_computed_values():
    # [1,3,3,1]/8 per axis; at the border one tap falls on zero padding -> 7/8 per axis.
    down = np.asarray(fir.downsample_2d(jnp.ones((1, 4, 4, 1))))[0, :, :, 0]
    np.testing.assert_allclose(down, np.full((2, 2), 49 / 64), rtol=1e-6)
    # Upsampling uses [1,3,3,1]/4 per phase; the first/last output row loses the weight-1 tap.
    up = np.asarray(fir.upsample_2d(jnp.ones((1, 2, 2, 1))))[0, :, :, 0]
    edge = np.array([0.75, 1.0, 1.0, 0.75])
    np.testing.assert_allclose(up, np.outer(edge, edge), rtol=1e-6)


@pytest.mark.parametrize("impl", fir.IMPLS)
@pytest.mark.parametrize("kernel", [(1, 3, 3, 1), (1, 2, 3, 4), (1, 1)])
def test_fir_matches_numpy_upfirdn(kernel, impl):
    x = np.random.default_rng(0).normal(size=(2, 6, 8, 3))
    k2 = np.outer(kernel, kernel) / np.sum(kernel) ** 2
    p = len(kernel) - 2
    ref_down = _np_upfirdn(x, k2, 1, 2, (p + 1) // 2, p // 2)
    ref_up = _np_upfirdn(x, 4 * k2, 2, 1, (p + 1) // 2 + 1, p // 2)
    got_down = np.asarray(fir.downsample_2d(jnp.asarray(x, jnp.float32), kernel, impl=impl))
    got_up = np.asarray(fir.upsample_2d(jnp.asarray(x, jnp.float32), kernel, impl=impl))
    assert got_down.shape == (2, 3, 4, 3) and got_up.shape == (2, 12, 16, 3)
    np.testing.assert_allclose(got_down, ref_down, atol=1e-5)
    np.testing.assert_allclose(got_up, ref_up, atol=1e-5)


def test_fir_preserves_constant_interior():
    x = jnp.full((1, 16, 16, 2), 2.5)
    down = np.asarray(fir.downsample_2d(x))
    up = np.asarray(fir.upsample_2d(x))
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], 2.5, rtol=1e-6)
    np.testing.assert_allclose(up[:, 1:-1, 1:-1], 2.5, rtol=1e-6)


def test_fused_resampling_convs_match_unfused_interior():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 12, 12, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)

    def conv_same(v):
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(v, w, (1, 1), "SAME", dimension_numbers=dn)

    down = np.asarray(fir.conv_downsample_2d(x, w))
    down_ref = np.asarray(fir.downsample_2d(conv_same(x)))
    assert down.shape == (1, 6, 6, 5)
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], down_ref[:, 1:-1, 1:-1], atol=1e-4)
    up = np.asarray(fir.upsample_conv_2d(x, w))
    up_ref = np.asarray(conv_same(fir.upsample_2d(x)))
    assert up.shape == (1, 24, 24, 5)
    np.testing.assert_allclose(up[:, 2:-2, 2:-2], up_ref[:, 2:-2, 2:-2], atol=1e-4)


@pytest.mark.parametrize("kernel", [(1, 3, 3, 1), (1, 2, 3, 4), (1, 4, 6, 4, 1)])
def test_fir_impls_agree_on_values_gradients_and_dtype(kernel):
    """'separable' (shifted slices) computes what 'conv' (depthwise convolutions) does, for every
    resampling function, forward and backward; bf16 in gives bf16 out, summed in float32."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 8, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    fns = {
        "down": lambda v, impl: fir.downsample_2d(v, kernel, impl=impl),
        "up": lambda v, impl: fir.upsample_2d(v, kernel, impl=impl),
        "conv_down": lambda v, impl: fir.conv_downsample_2d(v, w, kernel, impl=impl),
        "up_conv": lambda v, impl: fir.upsample_conv_2d(v, w, kernel, impl=impl),
    }
    for name, f in fns.items():
        # Jitted: one compile per function instead of one per eager op (half the time here).
        a, b = (jax.jit(lambda v, f=f, i=i: f(v, i))(x) for i in fir.IMPLS)
        assert a.shape == b.shape, name
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=name)
        grads = (jax.jit(jax.grad(lambda v, f=f, i=i: jnp.sum(f(v, i) ** 2))) for i in fir.IMPLS)
        ga, gb = (g(x) for g in grads)
        np.testing.assert_allclose(gb, ga, atol=1e-4, err_msg=name)
    y = fir.downsample_2d(x.astype(jnp.bfloat16), kernel, impl="separable")
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), fns["down"](x, "conv"), atol=0.02)


@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize("kernel", [(1,), (1, 1), (1, 2, 1), (1, 3, 3, 1)])
def test_fir_impls_agree_for_other_factors_and_short_kernels(kernel, factor):
    """Kernels shorter than the factor leave upsampling phases without taps (zeros)."""
    x = jnp.asarray(np.random.default_rng(8).normal(size=(1, 7, 6, 2)), jnp.float32)
    for f in (fir.downsample_2d, fir.upsample_2d):
        a = f(x, kernel, factor, impl="conv")
        b = f(x, kernel, factor, impl="separable")
        assert a.shape == b.shape, (f.__name__, a.shape, b.shape)
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=f.__name__)


def test_fir_impl_rejects_unknown_name():
    with pytest.raises(ValueError, match="FIR impl must be one of"):
        fir.downsample_2d(jnp.ones((1, 4, 4, 1)), impl="fft")


def test_fir_impls_give_the_same_network():
    """The model-level switch (gin: FIR_IMPL) changes kernels, not the function: same weights,
    same outputs, for the backbone's BigGAN resampling blocks and its FIRConv input pyramid."""
    x, t, _ = _inputs()
    nets = {impl: NCSNpp(**SMALL, out_channels=C, fir_impl=impl) for impl in fir.IMPLS}
    shapes = jax.eval_shape(lambda k: nets["conv"].init(k, x, t, train=False), jax.random.key(0))
    params = _rand_params(shapes, 4)
    outs = {
        i: jax.jit(lambda p, n=n: n.apply(p, x, t, train=False)[0])(params) for i, n in nets.items()
    }
    assert np.abs(outs["conv"]).max() > 1e-3
    np.testing.assert_allclose(outs["separable"], outs["conv"], atol=1e-4)

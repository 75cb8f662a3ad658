"""The reference project's joint model, pinned by construction (docs/recipe.md sections 2-3).

The reference head (boingkiri/joint_training b3bc451, model/unetpp.py UNetppHead and
ScoreDistillPrecond) differs from a generic EDM U-Net head in five places; each test below
recomputes one of them from the network's captured intermediates and its parameters:
1. the feature handed over is silu(GroupNorm(h)), the input of the backbone's output conv;
2. the feature LayerNorm is per pixel, over channels;
3. a GroupNorm follows it, before the fusion;
4. fuse_conv(silu(concat[x, f_in, feature])) enters the stem conv with no activation between;
5. every block adds Dense(emb) of the embedding itself (no activation).
Then the EMA warm-up and gin/reference.gin. Everything runs on one-level models of a few
thousand parameters (one jitted forward per network).
"""

from __future__ import annotations

import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcdm.ict import losses, objective
from jcdm.models import NCSNpp, ScoreHead
from jcdm.training import step as step_lib

S, B, C, NF = 8, 2, 3, 32
TINY = dict(nf=NF, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), image_size=S)


def _rand(tree, seed):
    rng = np.random.default_rng(seed)

    def leaf(s):
        return jnp.asarray(rng.normal(0.0, 0.3, s.shape), jnp.float32)

    return jax.tree.map(leaf, tree)


def _group_norm(x, scale, bias, groups, eps=1e-6):
    """GroupNorm by definition, in float64 numpy."""
    x = np.asarray(x, np.float64)
    g = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y * np.asarray(scale) + np.asarray(bias)


def _conv(x, p):
    """'SAME' NHWC convolution with the layer's kernel and bias."""
    y = jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32),
        p["kernel"],
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return np.asarray(y + p["bias"], np.float64)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _out(inter, *path):
    """The (first) output a captured submodule returned."""
    for p in path:
        inter = inter[p]
    return inter["__call__"][0]


@pytest.fixture(scope="module")
def nets():
    """Backbone and head with random weights, one forward each with all intermediates."""
    backbone = NCSNpp(**TINY, out_channels=C, dropout=0.0)
    head = ScoreHead(**TINY, out_channels=C, norm_groups=32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, S, S, C)), jnp.float32)
    f_in = jnp.asarray(rng.normal(size=(B, S, S, C)), jnp.float32)
    c_noise = jnp.asarray([-1.0, 0.6], jnp.float32)
    vb = jax.eval_shape(lambda: backbone.init(jax.random.key(0), x, c_noise, train=False))
    pb = _rand(vb, 1)
    out, temb, feat = backbone.apply(pb, x, c_noise, train=False)
    # Pixels of very different scales: a norm over (H, W, C) jointly would keep the ratios.
    feat_in = feat * jnp.asarray(rng.uniform(0.1, 10.0, (B, S, S, 1)), jnp.float32)
    vh = jax.eval_shape(
        lambda: head.init(jax.random.key(0), x, c_noise, f_in, feat_in, temb, train=False)
    )
    ph = _rand(vh, 2)
    fwd = jax.jit(
        lambda pb, ph: (
            backbone.apply(pb, x, c_noise, train=False, capture_intermediates=True),
            head.apply(
                ph, x, c_noise, f_in, feat_in, temb, train=False, capture_intermediates=True
            ),
        )
    )
    (b_res, b_vars), (h_res, h_vars) = fwd(pb, ph)
    return dict(
        pb=pb["params"],
        ph=ph["params"],
        b_out=b_res,
        b_inter=b_vars["intermediates"],
        h_inter=h_vars["intermediates"],
        x=x,
        f_in=f_in,
        feat_in=feat_in,
    )


def test_1_feature_is_silu_groupnorm_of_last_block(nets):
    out, _, feat = nets["b_out"]
    inter, p = nets["b_inter"], nets["pb"]
    last = max(int(k.split("_")[1]) for k in inter if k.startswith("ResBlockBigGAN_"))
    h = _out(inter, f"ResBlockBigGAN_{last}")
    gn = p["GroupNorm_0"]  # the backbone's output norm: min(C // 4, 32) groups
    want = _silu(_group_norm(h, gn["scale"], gn["bias"], min(NF // 4, 32)))
    np.testing.assert_allclose(feat, want, rtol=1e-4, atol=1e-5)
    # ... and it is exactly what the output conv consumes.
    np.testing.assert_allclose(out, _conv(feat, p["Conv_1"]), rtol=1e-4, atol=1e-5)


def test_2_feature_layernorm_is_per_pixel_over_channels(nets):
    p = nets["ph"]["feat_norm"]
    f = np.asarray(nets["feat_in"], np.float64)
    mean, var = f.mean(-1, keepdims=True), f.var(-1, keepdims=True)
    want = (f - mean) / np.sqrt(var + 1e-6) * np.asarray(p["scale"]) + np.asarray(p["bias"])
    got = _out(nets["h_inter"], "feat_norm")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_3_groupnorm_after_the_layernorm(nets):
    p, inter = nets["ph"], nets["h_inter"]
    assert set(p["feat_group_norm"]) == {"scale", "bias"}
    assert p["feat_group_norm"]["scale"].shape == (NF,)
    g = p["feat_group_norm"]
    want = _group_norm(_out(inter, "feat_norm"), g["scale"], g["bias"], 32)
    # Flax's GroupNorm takes var = E[x^2] - E[x]^2 in float32: one channel per group after a
    # per-pixel LayerNorm leaves channel means large next to their spread, so agreement is ~1e-3
    # (the reference uses the same nn.GroupNorm); another group count is off by O(1).
    np.testing.assert_allclose(_out(inter, "feat_group_norm"), want, rtol=1e-3, atol=2e-3)
    wrong = _group_norm(_out(inter, "feat_norm"), g["scale"], g["bias"], 8)
    assert np.max(np.abs(_out(inter, "feat_group_norm") - wrong)) > 0.1


def test_4_fusion_is_conv_of_silu_concat_then_stem_without_activation(nets):
    p, inter = nets["ph"], nets["h_inter"]
    cat = np.concatenate(
        [np.asarray(nets["x"]), np.asarray(nets["f_in"]), _out(inter, "feat_group_norm")], -1
    )
    fused = _out(inter, "fuse_conv")
    np.testing.assert_allclose(fused, _conv(_silu(cat), p["fuse_conv"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        _out(inter, "stem_conv"), _conv(fused, p["stem_conv"]), rtol=1e-4, atol=1e-4
    )


def test_5_head_blocks_add_affine_of_the_embedding_backbone_blocks_of_its_silu(nets):
    emb = np.asarray(_out(nets["h_inter"], "temb_fuse"), np.float64)
    blocks = [k for k in nets["ph"] if k.startswith("ResBlockBigGAN_")]
    assert len(blocks) >= 3
    for name in blocks:
        d = nets["ph"][name]["Dense_0"]
        got = _out(nets["h_inter"], name, "Dense_0")
        want = emb @ np.asarray(d["kernel"], np.float64) + np.asarray(d["bias"])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
    # NCSN++ keeps its own rule: Dense(silu(temb)).
    _, temb, _ = nets["b_out"]
    d = nets["pb"]["ResBlockBigGAN_0"]["Dense_0"]
    want = _silu(np.asarray(temb, np.float64)) @ np.asarray(d["kernel"]) + np.asarray(d["bias"])
    np.testing.assert_allclose(
        _out(nets["b_inter"], "ResBlockBigGAN_0", "Dense_0"), want, rtol=1e-4, atol=1e-5
    )


def test_head_groupnorms_have_the_configured_group_count(nets):
    # 32 groups on 32 channels: one channel per group, unlike NCSN++'s min(32 // 4, 32) = 8.
    p, inter = nets["ph"]["ResBlockBigGAN_0"], nets["h_inter"]["ResBlockBigGAN_0"]
    h = _out(inter, "Conv_0") + _out(inter, "Dense_0")[:, None, None, :]
    got = _out(inter, "GroupNorm_1")
    gn = p["GroupNorm_1"]
    # Flax's float32 E[x^2] - E[x]^2 variance: ~1e-3 agreement (see test 3); 8 groups: O(1) off.
    np.testing.assert_allclose(got, _group_norm(h, gn["scale"], gn["bias"], 32), atol=2e-3)
    assert np.max(np.abs(got - _group_norm(h, gn["scale"], gn["bias"], 8))) > 0.1
    with pytest.raises(ValueError, match="do not split into 32 groups"):
        ScoreHead(**dict(TINY, nf=16), norm_groups=32).init(
            jax.random.key(0),
            *(jnp.zeros((1, S, S, C)), jnp.zeros((1,)), jnp.zeros((1, S, S, C))),
            jnp.zeros((1, S, S, 16)),
            jnp.zeros((1, 64)),
            train=False,
        )


def test_head_default_preconditioning_is_the_consistency_one():
    assert objective.ICTConfig().head_precond == "cm"
    # D = c_skip x + c_out F with c_skip(sigma_min) = 1, c_out(sigma_min) = 0 (model/unetpp.py
    # L899-902): at sigma_min the head's denoiser is the identity whatever F is.
    cfg = objective.ICTConfig()
    x = jnp.ones((1, 2, 2, 1))
    d = objective.head_denoiser(
        lambda *a: jnp.full_like(x, 7.0), None, x, jnp.asarray([cfg.sigma_min]), x, x, x, cfg
    )
    np.testing.assert_allclose(d, x, atol=1e-6)


# ---------------------------------------------------------------- EMA warm-up


def test_ema_decay_at_follows_the_reference_schedule():
    # The reference's decay for its n-th update (n = gradient_step after it, 1-based) is
    # 0 if max(n - 1 - 1, 0) <= 0 else beta: updates 1 and 2 get 0 (utils/ema/default_ema.py).
    ref = [0.0 if max(n - 2, 0) <= 0 else 0.99993 for n in range(1, 7)]
    got = [float(losses.ema_decay_at(s, 0.99993, 2)) for s in range(6)]
    np.testing.assert_array_equal(np.float32(got), np.float32(ref))
    assert float(losses.ema_decay_at(0, 0.99993, 0)) == np.float32(0.99993)


class _TinyBackbone(nn.Module):
    @nn.compact
    def __call__(self, x, c_noise, *, train):
        h = nn.Conv(3, (1, 1))(x)
        return h, jnp.zeros((x.shape[0], 4)), h


def test_train_step_ema_restarts_after_the_warmup_updates():
    nets_ = step_lib.Networks(backbone=_TinyBackbone(), head=None)
    tx = optax.sgd(0.1)
    cfg = objective.ICTConfig(head="none", s1=20)
    state = step_lib.init_state(0, nets_, tx, (4, 4, 3))
    step = jax.jit(
        step_lib.make_train_step(nets_, tx, cfg, total_steps=10, ema_decay=0.9, ema_warmup_steps=2)
    )
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    history = []
    for _ in range(3):
        state, _ = step(state, x)
        history.append(jax.device_get((state.params, state.ema_params)))
    for params, ema in history[:2]:  # decay 0: the EMA is the latest parameters
        jax.tree.map(lambda e, p: np.testing.assert_array_equal(e, p), ema, params)
    (p2, e2), (p3, e3) = history[1], history[2]
    jax.tree.map(
        lambda e, a, b: np.testing.assert_allclose(e, 0.9 * a + 0.1 * b, rtol=1e-6), e3, e2, p3
    )
    assert not np.allclose(p3["backbone"]["Conv_0"]["kernel"], p2["backbone"]["Conv_0"]["kernel"])


def test_ema_warmup_default_comes_from_gin():
    gin.clear_config()
    try:
        gin.parse_config(["EMAConfig.warmup_steps = 2"])
        assert step_lib.EMAConfig().warmup_steps == 2
    finally:
        gin.clear_config()
    assert step_lib.EMAConfig().warmup_steps == 0
    with pytest.raises(ValueError, match="warmup_steps"):
        step_lib.EMAConfig(warmup_steps=-1)


# ---------------------------------------------------------------- gin/reference.gin


def _resolve(repo, name):
    """Parse gin/<name> as jcdm.main does and return a query function."""
    import jcdm.register  # noqa: F401  (every configurable)

    gin.clear_config()
    gin.add_config_file_search_path(os.path.join(repo, "gin"))
    gin.parse_config_file(os.path.join(repo, "gin", name))
    return gin.query_parameter


@pytest.mark.parametrize("name", ["reference.gin", "reference_vanilla.gin"])
def test_reference_gin_is_the_reference_recipe(repo, name):
    try:
        q = _resolve(repo, name)
        expect = {
            "ICTConfig.distance": "pseudo_huber_per_pixel",
            "ICTConfig.huber_c": 0.003,
            "ICTConfig.head": "vanilla" if "vanilla" in name else "joint",
            "ICTConfig.head_precond": "cm",
            "ICTConfig.joint_weight": 0.3,
            "ICTConfig.s0": 10,
            "ICTConfig.s1": 1280,
            "ScoreHead.norm_groups": 32,
            "ScoreHead.num_res_blocks": 1,
            "ScoreHead.dropout": 0.0,
            "NCSNpp.dropout": 0.3,
            "NCSNpp.fourier_scale": 0.02,
            "EMAConfig.warmup_steps": 2,
            "train.ema_decay": 0.99993,
            "train.global_batch_size": 1024,
            "%NUM_STEPS": 400000,
            "make_optimizer.learning_rate": 1e-4,
            "make_train_iterator.shuffle": "buffer",
            "make_train_iterator.shuffle_buffer_size": 1000,
            "make_train_iterator.random_flip": True,
            "EvalConfig.two_step_sigma": 0.661,
            "EvalConfig.head_heun_steps": 18,
            "EvalConfig.every": 1000,
            "FIDConfig.every": 10000,
            "FIDConfig.num_samples": 50000,
            "CheckpointConfig.keep_best_fid": 1,
            "CheckpointConfig.fid_metric": "fid_1step",
        }
        got = {k: q(k) for k in expect}
        assert got == expect
    finally:
        gin.clear_config()


def test_joint_gin_stays_the_ict_paper_recipe_with_the_reference_head(repo):
    try:
        q = _resolve(repo, "joint.gin")
        assert q("ICTConfig.distance") == "pseudo_huber"
        assert q("ICTConfig.huber_c") is None
        assert q("EvalConfig.two_step_sigma") == 0.821
        assert q("make_train_iterator.shuffle") == "global"
        assert q("CheckpointConfig.keep_best_fid") == 0
        assert q("ICTConfig.head_precond") == "cm"
        assert q("EvalConfig.head_heun_steps") == 0
    finally:
        gin.clear_config()

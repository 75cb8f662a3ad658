"""The fused optimizer step (jcdm.training.update, jcdm.ict.optim) against optax leaf by leaf.

Same numbers to float32 rounding through RAdam's uncorrected early steps and its rectified
ones, with packed and unpacked leaves mixed; the guard returns the state bitwise; the state
layout is optax's (so checkpoints cross between the two); the compiled step launches fewer ops.
And the head's mode: 'vanilla' trains the backbone bitwise as 'none' (iCT) does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcdm.dev import profiling
from jcdm.ict import objective, optim
from jcdm.models import NCSNpp, ScoreHead
from jcdm.training import step as step_lib
from jcdm.training import train as train_lib
from jcdm.training import update

SHAPES = {"a": (3, 3, 4, 8), "b": (8,), "c": {"d": (16, 5), "e": ()}}
LR = 3e-3


def _tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, scale, s), jnp.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _run(opt, steps, *, packable=None, decay=0.9):
    params, ema = _tree(0), _tree(0)
    opt_state = opt.init(params)
    out = []
    fn = jax.jit(
        lambda g, p, o, e: opt.step(
            g,
            p,
            o,
            e,
            ema_decay=jnp.float32(decay),
            frozen=jnp.bool_(False),
            loss_finite=jnp.bool_(True),
            packable=packable,
        )
    )
    for i in range(steps):
        u = fn(_tree(100 + i, scale=0.1), params, opt_state, ema)
        params, opt_state, ema = u.params, u.opt_state, u.ema_params
        out.append(jax.device_get(u))
    return out


def _close(a, b, rtol=2e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7), a, b)


@pytest.mark.parametrize("pack", ["all", "mixed", "none"])
def test_fused_equals_optax_radam_and_ema(pack):
    # 12 steps: RAdam's first ~5 take the unrectified branch (rho_t < 5), the rest the adaptive.
    mask = {"all": None, "none": jax.tree.map(lambda _: False, _tree(0))}.get(
        pack, {"a": True, "b": False, "c": {"d": True, "e": False}}
    )
    fused = _run(update.FusedRAdam(LR), 12, packable=mask)
    ref = _run(update.PerLeaf(optax.radam(LR)), 12)
    for f, r in zip(fused, ref, strict=True):
        _close(f.params, r.params)
        _close(f.ema_params, r.ema_params)
        _close(f.opt_state, r.opt_state)
        np.testing.assert_allclose(f.grad_norm, r.grad_norm, rtol=1e-6)
        assert not f.kept and not r.kept
    assert int(fused[-1].opt_state[0].count) == 12
    # both branches of RAdam were taken: unrectified at step 1, rectified by step 12
    rect = [bool(optim.radam_scalars(jnp.int32(t), b1=0.9, b2=0.999).rectified) for t in (1, 12)]
    assert rect == [False, True]
    assert np.abs(fused[-1].params["a"] - np.asarray(_tree(0)["a"])).max() > LR


@pytest.mark.parametrize("impl", ["fused", "optax"])
@pytest.mark.parametrize("why", ["nan_grad", "nan_loss", "frozen"])
def test_guard_returns_the_state_bitwise(impl, why):
    opt = train_lib.make_optimizer(learning_rate=LR, impl=impl)
    params, ema = _tree(0), _tree(1)
    opt_state = opt.init(params)
    opt_state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.int32 else x + 0.5, opt_state)
    grads = _tree(2)
    if why == "nan_grad":
        grads["c"]["d"] = grads["c"]["d"].at[1, 1].set(jnp.nan)
    u = opt.step(
        grads,
        params,
        opt_state,
        ema,
        ema_decay=jnp.float32(0.9),
        frozen=jnp.bool_(why == "frozen"),
        loss_finite=jnp.bool_(why != "nan_loss"),
        packable=None,
    )
    assert bool(u.kept)
    same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jax.tree.map(same, u.params, params)
    jax.tree.map(same, u.ema_params, ema)
    jax.tree.map(same, u.opt_state, opt_state)
    assert np.isfinite(u.grad_norm) == (why != "nan_grad")


def test_state_layout_is_optax_s_so_checkpoints_cross_impls():
    params = _tree(0)
    fused = update.FusedRAdam(LR).init(params)
    ref = optax.radam(LR).init(params)
    assert jax.tree.structure(fused) == jax.tree.structure(ref)
    paths = lambda t: [(jax.tree_util.keystr(p), x.shape) for p, x in jax.tree.leaves_with_path(t)]
    assert paths(fused) == paths(ref)


def test_make_optimizer_refuses_an_unknown_impl_and_picks_by_backend():
    with pytest.raises(ValueError, match=r"make_optimizer.impl must be one of .*'fused'"):
        train_lib.make_optimizer(impl="adamw")
    auto = train_lib.make_optimizer()  # 'auto': per leaf on a CPU, fused on accelerators
    assert isinstance(auto, update.PerLeaf if jax.default_backend() == "cpu" else update.FusedRAdam)


def test_replicated_leaves_marks_what_may_be_packed():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    ns = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    tree = {"w": ns(None, "fsdp"), "b": ns(), "k": ns(None, None)}
    assert update.replicated_leaves(tree) == {"w": False, "b": True, "k": True}


# --- the whole train step: joint loss, fused vs optax, on a one-level network pair ---------------

TINY = dict(nf=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), image_size=8)


def _train(impl, steps=3):
    nets = step_lib.Networks(
        backbone=NCSNpp(**TINY), head=ScoreHead(**TINY, norm_groups=4, out_channels=3)
    )
    tx = train_lib.make_optimizer(learning_rate=1e-3, impl=impl)
    cfg = objective.ICTConfig(head="joint", s1=20)
    state = step_lib.init_state(0, nets, tx, (8, 8, 3))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
    step = step_lib.make_train_step(nets, tx, cfg, total_steps=10, ema_decay=0.9)
    compiled = jax.jit(step).lower(state, x).compile()  # one compile: run it and count its ops
    losses = []
    for _ in range(steps):
        state, metrics = compiled(state, x)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state), profiling.entry_op_counts(compiled.as_text())


def test_fused_train_step_keeps_the_losses_and_launches_fewer_ops():
    (l_f, s_f, ops_f), (l_o, s_o, ops_o) = _train("fused"), _train("optax")
    np.testing.assert_allclose(l_f, l_o, rtol=1e-5)
    _close(s_f.params, s_o.params, rtol=1e-4)
    _close(s_f.ema_params, s_o.ema_params, rtol=1e-4)
    assert int(s_f.step) == int(s_o.step) == 3
    # the per-leaf optimizer, EMA and guard are gone from the compiled step's top level
    assert ops_f["total"] < 0.85 * ops_o["total"], (ops_f, ops_o)
    assert ops_f["fusion_reduce"] < 0.8 * ops_o["fusion_reduce"], (ops_f, ops_o)


@pytest.mark.parametrize("unroll", [False, True])
def test_multi_step_is_the_same_updates_as_one_call_per_step(unroll):
    """make_multi_step (train.steps_per_call, train.unroll_steps): a scan over stacked batches,
    rolled or unrolled, gives the state and last metrics of calling the step once per batch.
    The trainer-level check (tests/test_precision.py) runs the rolled scan end to end."""

    def toy_step(state, x):
        w, key = state
        key, sub = jax.random.split(key)
        w = 0.9 * w + jnp.tanh(x @ w) + 0.01 * jax.random.normal(sub, w.shape)
        return (w, key), {"loss": jnp.sum(w**2), "x": jnp.sum(x)}

    xs = jax.random.normal(jax.random.key(1), (4, 3, 3))
    state = (jnp.eye(3), jax.random.key(0))
    multi = jax.jit(step_lib.make_multi_step(toy_step, 2, unroll=unroll))
    single = jax.jit(toy_step)
    s_multi, s_single = state, state
    for i in range(0, 4, 2):
        s_multi, m_multi = multi(s_multi, xs[i : i + 2])
        for x in xs[i : i + 2]:
            s_single, m_single = single(s_single, x)
        np.testing.assert_allclose(m_multi["loss"], m_single["loss"], rtol=1e-6)
        assert float(m_multi["x"]) == float(m_single["x"])  # the last step's metrics
    np.testing.assert_allclose(s_multi[0], s_single[0], rtol=1e-6)
    assert step_lib.make_multi_step(toy_step, 1) is toy_step


def test_vanilla_trains_the_backbone_exactly_as_ict():
    """With the head detached ('vanilla') the backbone gets iCT's updates ('none'): the same
    gradient (the head's loss stops at the features), the same noise, sigmas and dropout (the
    head's draws are split off) and a per-leaf optimizer. The 400-step study saw it bitwise on
    every seed; the longer studies leave the vanilla arm out for this reason (docs/results.md)."""
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
    tx = train_lib.make_optimizer(learning_rate=1e-3, impl="optax")
    out = {}
    for mode in ("vanilla", "none"):
        head = None if mode == "none" else ScoreHead(**TINY, norm_groups=4, out_channels=3)
        nets = step_lib.Networks(backbone=NCSNpp(**TINY), head=head)
        state = step_lib.init_state(0, nets, tx, (8, 8, 3))
        init = jax.device_get(state.params["backbone"])
        cfg = objective.ICTConfig(head=mode, s1=20)
        step = jax.jit(step_lib.make_train_step(nets, tx, cfg, total_steps=10, ema_decay=0.9))
        losses = []
        for _ in range(3):
            state, metrics = step(state, x)
            losses.append(float(metrics["loss_ct"]))
        out[mode] = losses, jax.device_get(state.params["backbone"])
    assert out["vanilla"][0] == out["none"][0]  # the consistency loss, step by step
    trained = jax.tree.leaves(out["none"][1])
    assert any(not np.array_equal(a, b) for a, b in zip(trained, jax.tree.leaves(init)))
    for a, b in zip(jax.tree.leaves(out["vanilla"][1]), trained, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""Gradient routing of the joint objective with the real (tiny) networks (docs/recipe.md
section 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcdm import models
from jcdm.ict import objective
from jcdm.training.step import Networks

# One resolution level with attention: the routing under test (backbone features and time
# embedding into the head, the teacher's stop-gradient, shared dropout) is the same at any size,
# and this size compiles in seconds (resampling paths: tests/test_models.py).
TINY = dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), image_size=8)
SHAPE = (2, 8, 8, 3)


@pytest.fixture(scope="module")
def setup():
    nets = Networks(
        backbone=models.NCSNpp(dropout=0.1, out_channels=3, **TINY),
        head=models.ScoreHead(out_channels=3, **TINY),
    )
    params = nets.init_params(jax.random.PRNGKey(0), SHAPE[1:])
    # init_scale = 0 zeroes the output convs, which blocks every gradient but theirs at step 0;
    # perturb the parameters so the test sees the routing of a trained network.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    leaves = [v + 0.02 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]
    params = jax.tree.unflatten(treedef, leaves)
    x = jax.random.uniform(jax.random.PRNGKey(1), SHAPE, minval=-1, maxval=1)
    return nets, params, x


def loss_terms(nets, params, x, cfg, backbone=None):
    return objective.joint_loss(
        params,
        x,
        jax.random.PRNGKey(2),
        3,
        backbone=backbone or nets.backbone_apply,
        head=nets.head_apply,
        cfg=cfg,
        total_steps=8,
    )


def grad_of(term, nets, params, x, cfg, backbone=None):
    f = lambda p: loss_terms(nets, p, x, cfg, backbone)[1][term]
    return jax.jit(jax.grad(f))(params)


def norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(tree))))


def test_head_gradient_reaches_backbone_only_in_joint_mode(setup):
    nets, params, x = setup
    g_joint = grad_of("loss_dsm", nets, params, x, objective.ICTConfig(head="joint"))
    g_vanilla = grad_of("loss_dsm", nets, params, x, objective.ICTConfig(head="vanilla"))
    assert norm(g_joint["backbone"]) > 1e-6
    assert norm(g_vanilla["backbone"]) == 0.0
    # The head itself learns in both modes, identically (same forward pass).
    assert norm(g_vanilla["head"]) > 1e-6
    np.testing.assert_allclose(
        np.asarray(jax.tree.leaves(g_joint["head"])[0]),
        np.asarray(jax.tree.leaves(g_vanilla["head"])[0]),
        rtol=1e-5,
        atol=1e-8,
    )


def test_teacher_receives_no_gradient(setup):
    """Replacing the teacher's output by a constant leaves every gradient unchanged."""
    nets, params, x = setup
    cfg = objective.ICTConfig(head="none")
    calls = []

    def recording(p, x_in, c, key):
        out = nets.backbone_apply(p, x_in, c, key)
        calls.append(out[0])
        return out

    # Tracing fills `calls`; the jitted function returns the second backbone call's raw output,
    # the teacher's.
    teacher_out = jax.jit(lambda p: (loss_terms(nets, p, x, cfg, recording), calls[1])[1])(params)
    n = [0]

    def frozen_teacher(p, x_in, c, key):
        out = nets.backbone_apply(p, x_in, c, key)
        n[0] += 1
        return (teacher_out, *out[1:]) if n[0] % 2 == 0 else out

    g = grad_of("loss_ct", nets, params, x, cfg)
    g_frozen = grad_of("loss_ct", nets, params, x, cfg, frozen_teacher)
    assert norm(g["backbone"]) > 0
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_frozen)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-10)


def test_student_and_teacher_share_dropout_key(setup):
    nets, params, x = setup
    seen = []

    def recording(p, x_in, c, key):
        seen.append(key)
        return nets.backbone_apply(p, x_in, c, key)

    cfg = objective.ICTConfig(head="none")
    keys = jax.jit(lambda p: (loss_terms(nets, p, x, cfg, recording), (seen[0], seen[1]))[1])(
        params
    )
    np.testing.assert_array_equal(np.asarray(keys[0]), np.asarray(keys[1]))


def test_none_mode_has_no_head_cost(setup):
    nets, params, x = setup
    cfg = objective.ICTConfig(head="none")
    loss, metrics = jax.jit(
        lambda p: objective.joint_loss(
            p,
            x,
            jax.random.PRNGKey(2),
            0,
            backbone=nets.backbone_apply,
            head=None,
            cfg=cfg,
            total_steps=8,
        )
    )({"backbone": params["backbone"]})
    assert "loss_dsm" not in metrics
    assert float(loss) == float(metrics["loss_ct"])

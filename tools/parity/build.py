"""Both sides of the comparison (docs/recipe.md section 2): jcdm's networks and settings from
gin/reference.gin, the reference's networks and loss code, the same weights on both, and the
shared images, noise and sigma pairs (`Setup`, built by `build`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from pathlib import Path
from typing import Any

from .common import MODES, REPO, SIZES, STEP, Size
from .mapping import MappingError, check_same_tree, map_backbone, map_head, randomize
from .reference import import_reference, load_reference_framework, reference_config


@dataclasses.dataclass
class Setup:
    """Both models with the same weights, and the shared inputs (built by `build`)."""

    size_name: str
    size: Size
    seed: int
    modules: types.SimpleNamespace  # the reference's imported modules
    nets: Any  # jcdm.training.step.Networks
    cfg: dict  # mode -> jcdm ICTConfig
    total_steps: int
    ema_decay: float
    ema_warmup: int
    ref_cfg: dict  # mode -> the reference's config
    ref_fw: dict  # mode -> (self stand-in, namespace, pinned random) of the reference framework
    ref_params: dict  # {"torso_state": ..., "head_state": ...}, the reference's layout
    head_order: tuple  # (enc, dec) of the reference head, see map_head
    params: dict = dataclasses.field(default_factory=dict)  # jcdm's layout, from ref_params
    y: Any = None  # images [B, H, W, 3]
    key: Any = None  # joint_loss's key
    idx: Any = None  # the sigma-pair indices joint_loss draws from `key`
    z: Any = None  # the noise joint_loss draws from `key`
    sigma_lo: Any = None  # the teacher's sigma_i per sample
    sigma_hi: Any = None  # the student's sigma_{i+1} per sample
    num_scales: int = 0  # N(k) at STEP

    def to_jcdm(self, tree: dict) -> dict:
        """A tree in the reference's layout (parameters or gradients) in jcdm's."""
        return {
            "backbone": map_backbone(tree["torso_state"]["NCSNpp_0"]),
            "head": map_head(tree["head_state"], *self.head_order),
        }


def _jcdm_side(size: Size) -> dict:
    """jcdm's networks and method settings from gin/reference.gin (sizes from `size`)."""
    import logging

    import gin

    import jcdm.register  # noqa: F401  (every gin configurable)
    from jcdm.ict import objective
    from jcdm.models import NCSNpp, ScoreHead
    from jcdm.training import step as step_lib

    gin.clear_config()
    gin.add_config_file_search_path(str(REPO / "gin"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs a miss for `include` before the search path
    try:
        gin.parse_config_file(str(REPO / "gin" / "reference.gin"))
    finally:
        root.setLevel(level)

    def query(name: str, default: Any = None) -> Any:
        try:
            return gin.query_parameter(name)
        except ValueError:
            return default

    try:
        base = objective.ICTConfig()
        fields = {
            f.name: query(f"ICTConfig.{f.name}", getattr(base, f.name))
            for f in dataclasses.fields(objective.ICTConfig)
        }
        joint = objective.ICTConfig(**fields)
        return dict(
            cfg={"joint": joint, "vanilla": dataclasses.replace(joint, head="vanilla")},
            total_steps=query("train.curriculum_steps") or query("%NUM_STEPS"),
            ema_decay=query("train.ema_decay"),
            ema_warmup=query("EMAConfig.warmup_steps", 0),
            nets=step_lib.Networks(
                backbone=NCSNpp(dropout=0.0, image_size=size.image, **size.jcdm_backbone),
                head=ScoreHead(dropout=0.0, image_size=size.image, **size.jcdm_head),
            ),
        )
    finally:
        gin.clear_config()


def _reference_params(rself: Any, image: int, seed: int) -> dict:
    """The reference's parameter trees, initialised as `CMFramework.init_model_state` does
    (consistency_framework.py), then every leaf redrawn (`randomize`)."""
    import jax
    import jax.numpy as jnp

    x1 = jnp.ones((1, image, image, 3), jnp.float32)
    sigma1 = jnp.ones([1])
    k_torso, k_head = jax.random.split(jax.random.PRNGKey(seed))
    torso = rself.model.init(
        {"params": k_torso, "dropout": k_torso},
        x=x1,
        sigma=sigma1,
        train=False,
        augment_labels=None,
    )["params"]
    d1, (t1, e1) = rself.model.apply(
        {"params": torso}, x=x1, sigma=sigma1, train=False, augment_labels=None
    )
    head = rself.head.init(
        {"params": k_head, "dropout": k_head},
        x=x1,
        sigma=sigma1,
        F_x=d1,
        last_x_emb=e1,
        t_emb=t1,
        train=False,
        augment_labels=None,
    )["params"]
    if set(torso) != {"NCSNpp_0"}:
        raise MappingError(f"reference CMPrecond parameters: {sorted(torso)}, not NCSNpp_0")
    return {"torso_state": randomize(torso, seed + 1), "head_state": randomize(head, seed + 2)}


def _head_order(modules: types.SimpleNamespace, rself: Any, head_params: dict) -> tuple:
    """(enc, dec) of the reference UNetppHead: (key, kind) in its forward (dict) order."""
    import flax.linen as nn

    unetpp = modules.unetpp
    bound = rself.head.bind({"params": head_params})

    def kinds(mods: Any) -> list[tuple[str, str]]:
        out = []
        for key, m in mods.items():
            if isinstance(m, unetpp.UNetBlock):
                out.append((key, "block"))
            elif isinstance(m, unetpp.CustomConv2d):
                out.append((key, "conv"))
            elif isinstance(m, nn.GroupNorm):
                out.append((key, "norm"))
            else:  # map_head refuses it
                out.append((key, type(m).__name__))
        return out

    return kinds(bound.head.enc), kinds(bound.head.dec)


def build(ref: Path, size_name: str, seed: int = 0) -> Setup:
    """Both sides with the same weights, and the inputs of the comparisons."""
    modules = import_reference(ref)
    import jax
    import jax.numpy as jnp
    import numpy as np

    if str(REPO) not in sys.path:
        sys.path.insert(1, str(REPO))
    from jcdm.ict import schedules

    size = SIZES[size_name]
    jc = _jcdm_side(size)
    ref_cfg = {m: reference_config(ref, size, vanilla=(m == "vanilla")) for m in MODES}
    ref_fw = {m: load_reference_framework(ref, modules, c) for m, c in ref_cfg.items()}
    rself = ref_fw["joint"][0]
    ref_params = _reference_params(rself, size.image, seed)
    head_order = _head_order(modules, rself, ref_params["head_state"])
    st = Setup(
        size_name=size_name,
        size=size,
        seed=seed,
        modules=modules,
        ref_cfg=ref_cfg,
        ref_fw=ref_fw,
        ref_params=ref_params,
        head_order=head_order,
        **jc,
    )
    st.params = st.to_jcdm(ref_params)
    jcdm_init = jax.eval_shape(
        functools.partial(st.nets.init_params, image_shape=(size.image, size.image, 3)),
        jax.random.key(0),
    )
    check_same_tree(st.params["backbone"], jcdm_init["backbone"], "backbone")
    check_same_tree(st.params["head"], jcdm_init["head"], "head")

    # Images, the loss's key, and the sigma indices and noise that joint_loss draws from it.
    cfg = st.cfg["joint"]
    st.y = jnp.asarray(
        np.random.default_rng(seed + 3).uniform(-1.0, 1.0, (size.batch, size.image, size.image, 3)),
        jnp.float32,
    )
    st.key = jax.random.PRNGKey(seed + 4)
    k_sigma, k_noise, _, _ = jax.random.split(st.key, 4)  # as objective.joint_loss splits it
    st.num_scales = schedules.num_scales(STEP, st.total_steps, cfg.s0, cfg.s1)
    grid = dict(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
    logits = schedules.index_logits(st.num_scales, cfg.s1 + 1, cfg.p_mean, cfg.p_std, **grid)
    st.idx = jax.random.categorical(k_sigma, logits, shape=(size.batch,))  # as sample_sigma_pairs
    st.z = jax.random.normal(k_noise, st.y.shape, jnp.float32)
    st.sigma_lo, st.sigma_hi = schedules.sample_sigma_pairs(
        k_sigma,
        st.num_scales,
        size.batch,
        max_n=cfg.s1 + 1,
        p_mean=cfg.p_mean,
        p_std=cfg.p_std,
        **grid,
    )
    return st

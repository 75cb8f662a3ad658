"""Parameter mapping (docs/recipe.md section 2): the reference's parameter trees as jcdm's, leaf
for leaf, the shape check against jcdm's own init, and the shared random redraw of every leaf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .common import ParityError


class MappingError(ParityError):
    """The two parameter trees do not correspond leaf for leaf."""


class _Source:
    """The reference's leaves by '/'-joined path; each must be taken exactly once."""

    def __init__(self, tree: dict, what: str) -> None:
        from flax import traverse_util

        self.flat = traverse_util.flatten_dict(dict(tree), sep="/")
        self.used: set[str] = set()
        self.what = what

    def has(self, path: str) -> bool:
        return path in self.flat

    def take(self, path: str) -> Any:
        if path not in self.flat:
            raise MappingError(f"{self.what}: the reference has no leaf {path!r}")
        if path in self.used:
            raise MappingError(f"{self.what}: reference leaf {path!r} mapped twice")
        self.used.add(path)
        return self.flat[path]

    def modules(self) -> list[str]:
        return list(dict.fromkeys(p.split("/")[0] for p in self.flat))

    def check_all_used(self) -> None:
        left = sorted(set(self.flat) - self.used)
        if left:
            raise MappingError(f"{self.what}: reference leaves left unmapped: {left}")


def _copy(src: _Source, prefix: str, names: Sequence[str] = ("kernel", "bias")) -> dict:
    return {n: src.take(f"{prefix}/{n}") for n in names}


def _norm(src: _Source, prefix: str) -> dict:
    return _copy(src, prefix, ("scale", "bias"))


def _weight_bias(src: _Source, prefix: str) -> dict:
    """A reference Linear / CustomConv2d (weight, bias) as a Flax Dense / Conv (kernel, bias)."""
    return {"kernel": src.take(f"{prefix}/weight"), "bias": src.take(f"{prefix}/bias")}


def map_backbone(ref_ncsnpp: dict) -> dict:
    """jcdm NCSNpp parameters from the reference NCSNpp's (model/ct/ncsnpp.py, layerspp.py).

    Both are Flax compact modules that create their layers in the same order, so module indices
    carry over: ResnetBlockBigGANpp_i -> ResBlockBigGAN_i (same inner names), AttnBlockpp_i ->
    AttnBlock_i (NIN_0..2 = q, k, v stacked into one qkv Dense; NIN_3 = proj), Downsample_i
    (the input pyramid's FIR conv) -> FIRConv_i, GaussianFourierProjection_0 ->
    GaussianFourierEmbedding_0; Dense_*, Conv_*, GroupNorm_* keep their names.
    """
    import jax.numpy as jnp

    src = _Source(ref_ncsnpp, "backbone")
    out: dict = {}
    for name in src.modules():
        kind, _, idx = name.rpartition("_")
        if kind == "GaussianFourierProjection":
            out[f"GaussianFourierEmbedding_{idx}"] = {"W": src.take(f"{name}/W")}
        elif kind in ("Dense", "Conv"):
            out[name] = _copy(src, name)
        elif kind == "GroupNorm":
            out[name] = _norm(src, name)
        elif kind == "ResnetBlockBigGANpp":
            block = {}
            for inner in ("GroupNorm_0", "GroupNorm_1"):
                block[inner] = _norm(src, f"{name}/{inner}")
            for inner in ("Conv_0", "Dense_0", "Conv_1", "Conv_2"):
                if src.has(f"{name}/{inner}/kernel"):
                    block[inner] = _copy(src, f"{name}/{inner}")
            out[f"ResBlockBigGAN_{idx}"] = block
        elif kind == "AttnBlockpp":
            nin = [f"{name}/NIN_{i}" for i in range(4)]
            out[f"AttnBlock_{idx}"] = {
                "GroupNorm_0": _norm(src, f"{name}/GroupNorm_0"),
                "qkv": {
                    "kernel": jnp.concatenate([src.take(f"{p}/W") for p in nin[:3]], axis=-1),
                    "bias": jnp.concatenate([src.take(f"{p}/b") for p in nin[:3]], axis=-1),
                },
                "proj": {"kernel": src.take(f"{nin[3]}/W"), "bias": src.take(f"{nin[3]}/b")},
            }
        elif kind == "Downsample":
            out[f"FIRConv_{idx}"] = _weight_bias(src, f"{name}/Conv2d_0")
        else:
            raise MappingError(f"backbone: no jcdm counterpart for reference module {name!r}")
    src.check_all_used()
    return out


def _qkv(src: _Source, prefix: str) -> dict:
    """The reference's fused qkv 1x1 conv, channel o = 3 c + j for j in (q, k, v)
    (AttentionModule: reshape (B, C, 3, HW), model/unetpp.py L130-131), as jcdm's [q | k | v]."""
    w = src.take(f"{prefix}/weight")[0, 0]  # [C_in, 3 C]
    b = src.take(f"{prefix}/bias")
    c_in, c3 = w.shape
    c = c3 // 3
    kernel = w.reshape(c_in, c, 3).transpose(0, 2, 1).reshape(c_in, c3)
    return {"kernel": kernel, "bias": b.reshape(c, 3).T.reshape(c3)}


def map_head(
    ref_head: dict, enc: Sequence[tuple[str, str]], dec: Sequence[tuple[str, str]]
) -> dict:
    """jcdm ScoreHead parameters from the reference ScoreDistillPrecond's (model/unetpp.py).

    `enc` / `dec`: (key, kind) of the reference UNetppHead's `enc` / `dec` modules in the order its
    forward pass runs them, kind 'block' (UNetBlock, with or without attention), 'conv' or 'norm'.
    jcdm's blocks and attention layers are numbered in its forward order, so the i-th UNetBlock
    is ResBlockBigGAN_i (norm0, conv0, affine, norm1, conv1, skip -> GroupNorm_0, Conv_0,
    Dense_0, GroupNorm_1, Conv_1, Conv_2) and the j-th attention is AttnBlock_j (norm2, qkv,
    proj).
    """
    src = _Source(ref_head, "head")
    out: dict = {
        "feat_norm": _norm(src, "layer_norm_for_last_x_emb"),
        "temb_norm": _norm(src, "layer_norm_for_t_emb"),
        "feat_group_norm": _norm(src, "head/normalize1"),
        "fuse_conv": _weight_bias(src, "head/conv1"),
        "Dense_0": _weight_bias(src, "head/map_layer0"),
        "Dense_1": _weight_bias(src, "head/map_layer1"),
        "temb_fuse": _weight_bias(src, "head/map_noise_proj"),
    }
    blocks = attns = 0
    for part, items in (("enc", enc), ("dec", dec)):
        for key, kind in items:
            p = f"head/{part}_{key}"
            if kind == "block":
                block = {
                    "GroupNorm_0": _norm(src, f"{p}/norm0"),
                    "Conv_0": _weight_bias(src, f"{p}/conv0"),
                    "Dense_0": _weight_bias(src, f"{p}/affine"),
                    "GroupNorm_1": _norm(src, f"{p}/norm1"),
                    "Conv_1": _weight_bias(src, f"{p}/conv1"),
                }
                if src.has(f"{p}/skip/weight"):
                    block["Conv_2"] = _weight_bias(src, f"{p}/skip")
                out[f"ResBlockBigGAN_{blocks}"] = block
                blocks += 1
                if src.has(f"{p}/atten/qkv/weight"):
                    proj = src.take(f"{p}/atten/proj/weight")[0, 0]
                    out[f"AttnBlock_{attns}"] = {
                        "GroupNorm_0": _norm(src, f"{p}/atten/norm2"),
                        "qkv": _qkv(src, f"{p}/atten/qkv"),
                        "proj": {"kernel": proj, "bias": src.take(f"{p}/atten/proj/bias")},
                    }
                    attns += 1
            elif kind == "conv" and part == "enc":
                if "stem_conv" in out:
                    raise MappingError(f"head: a second encoder conv {key!r}")
                out["stem_conv"] = _weight_bias(src, p)
            elif kind == "norm" and part == "dec":
                out["out_norm"] = _norm(src, p)
            elif kind == "conv" and part == "dec":
                out["out_conv"] = _weight_bias(src, p)
            else:
                raise MappingError(f"head: no jcdm counterpart for reference {part}_{key} ({kind})")
    src.check_all_used()
    return out


def check_same_tree(got: dict, want: Any, what: str) -> None:
    """Raise MappingError unless `got` has exactly `want`'s leaves with the same shapes."""
    from flax import traverse_util

    g = traverse_util.flatten_dict(dict(got), sep="/")
    w = traverse_util.flatten_dict(dict(want), sep="/")
    missing, extra = sorted(set(w) - set(g)), sorted(set(g) - set(w))
    if missing or extra:
        raise MappingError(f"{what}: jcdm leaves not mapped {missing}; unknown leaves {extra}")
    bad = [f"{k}: {g[k].shape} vs {w[k].shape}" for k in w if tuple(g[k].shape) != w[k].shape]
    if bad:
        raise MappingError(f"{what}: shape mismatch (mapped vs jcdm) {bad}")


def randomize(tree: Any, seed: int) -> Any:
    """Every leaf redrawn: kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), biases
    N(0, 0.2^2); the frozen Fourier features (W of a 1-D leaf named W) keep their init."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for path, leaf in flat:
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(leaf.shape)
        if len(shape) >= 2:
            new = rng.normal(0.0, 1.0 / math.sqrt(math.prod(shape[:-1])), shape)
        elif name == "W":
            new = np.asarray(leaf)
        elif name == "scale":
            new = 1.0 + rng.normal(0.0, 0.2, shape)
        else:
            new = rng.normal(0.0, 0.2, shape)
        leaves.append(jnp.asarray(new, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, leaves)

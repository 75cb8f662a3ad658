"""Parity of jcdm's reference joint model with the reference code (docs/recipe.md section 2).

    python tools/reference_parity.py --reference DIR [--out FILE] [--size small|cifar] [--tol T]

DIR is a checkout of boingkiri/joint_training at commit b3bc451 (docs/recipe.md, "Sources"):

    git clone https://github.com/boingkiri/joint_training /tmp/jt-ref
    git -C /tmp/jt-ref checkout b3bc451

jcdm's side is `gin/reference.gin` (its ICTConfig, EMA warm-up and network bindings), built with
jcdm's own NCSNpp, ScoreHead, `objective.joint_loss` and `step.Networks`. The reference's side is
its own code: the networks come from its `model/unetpp.py` (CMPrecond around `model/ct/ncsnpp.py`
NCSNpp, ScoreDistillPrecond around UNetppHead), the loss from its
`framework/diffusion/consistency_framework.py`, and its configs from `configs/` (cm_diffusion,
original_ict, score_head, ema_ict; `config_vanilla.yaml` for "vanilla").

Glue, not math, is this file's: `CMFramework.__init__` cannot be constructed without its data,
checkpoint, W&B and LPIPS machinery, so the statements of `__init__` that build the two networks,
the sigma grid and curriculum, and the nested functions `ict_sigma_sampling_fn`,
`get_sigma_sampling`, `pseudo_huber_loss_fn`, `get_loss` and `joint_training_loss_fn` are taken
from the file's syntax tree and executed unchanged against a stand-in `self` and the reference's
own YAML configs. Two random draws are pinned so that both sides see the same inputs: inside the
reference's code `jax.random.normal` returns the noise z and `jax.random.choice` returns the
sigma-pair indices that jcdm's `joint_loss` draws from its key (everything else in `jax` is the
real module). The reference's sigmas are then computed by its own grid from those indices.

Imports that the reference needs but that are irrelevant to the math are stubbed only when not
installed: `omegaconf` (a type annotation: `DictConfig` is `dict`) and `einops` (its `rearrange`
is used only by attention modules the reference's joint model does not contain; the stub raises).
The reference's training framework, W&B, LPIPS and TensorFlow are never imported.

Both sides get the same random weights (the reference's parameter tree is initialised, every
leaf redrawn at unit-variance scale so that no branch is the reference's near-zero init, then
jcdm's tree is built from it by an explicit name mapping that fails on any unmapped leaf or
shape mismatch; gradients map the same way), the same images, noise, sigma indices and step,
float32 on the CPU, dropout 0. Compared (relative L2 differences, jcdm against the reference):
the NCSN++ outputs (F, temb, the head feature) and f; the head's raw output and denoiser D on
identical inputs; the sigma grid, p(i), N(k) and the loss's sigma pair; the joint loss and its
terms; the gradients (whole tree, backbone, head and the worst single leaf) in the "joint" and
"vanilla" modes; the joint-to-vanilla ratio of the backbone gradient norm; the EMA warm-up
decays. Exit 0 when every difference is within `--tol`, 1 when one is not, 2 when the reference
is missing, cannot be imported or does not have the expected structure.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
REFERENCE_COMMIT = "b3bc45147e8e092b36e50edefe1eb934c7832e12"
HOW_TO_GET = (
    "git clone https://github.com/boingkiri/joint_training /tmp/jt-ref && "
    "git -C /tmp/jt-ref checkout b3bc451"
)
REQUIRED_FILES = (
    "model/unetpp.py",
    "model/ct/ncsnpp.py",
    "framework/diffusion/consistency_framework.py",
    "utils/ema/ema_cm.py",
    "configs/framework/diffusion/cm_diffusion.yaml",
    "configs/model/diffusion/original_ict.yaml",
    "configs/model/diffusion/score_head.yaml",
    "configs/ema/ema_ict.yaml",
    "configs/config_vanilla.yaml",
)
DEFAULT_TOL = 1e-4
STEP = 150_000  # curriculum step of the loss: N(k) = 81 at K = 400k
MODES = ("joint", "vanilla")
CURRICULUM_STEPS = (0, 49_999, 50_000, 100_000, 150_000, 250_000, 349_999, 350_000, 399_999)


class ParityError(Exception):
    """The reference cannot be used (missing, import failure, unexpected structure): exit 2."""


@dataclasses.dataclass(frozen=True)
class Size:
    """A test configuration: overrides of the reference's YAML and the matching jcdm kwargs."""

    image: int
    batch: int
    ref_backbone: dict
    ref_head: dict
    jcdm_backbone: dict
    jcdm_head: dict


SIZES = {
    # 16x16 images, nf 32, ch_mult (2, 2, 2) (16, 8, 4), 2 blocks per level, attention at 8x8
    # (the head's level-1 attention, the reference's is_atten [False, True, False]).
    "small": Size(
        image=16,
        batch=8,
        ref_backbone={"nf": 32, "num_res_blocks": 2, "attn_resolutions": [8]},
        ref_head={"n_channels": 32, "input_channels": 64},
        jcdm_backbone={"nf": 32, "num_res_blocks": 2, "attn_resolutions": (8,)},
        jcdm_head={"nf": 32, "attn_resolutions": (8,)},
    ),
    # The CIFAR-10 networks as configured (56.4M + 26.2M parameters); slow on a CPU.
    "cifar": Size(image=32, batch=2, ref_backbone={}, ref_head={}, jcdm_backbone={}, jcdm_head={}),
}


# ------------------------------------------------------------------------------ reference loading


class AttrDict(dict):
    """A dict with attribute access, standing in for omegaconf's DictConfig."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def _attrdict(tree: Any) -> Any:
    if isinstance(tree, dict):
        return AttrDict({k: _attrdict(v) for k, v in tree.items()})
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_reference_dir(ref: Path) -> None:
    """Raise ParityError unless `ref` looks like a checkout of boingkiri/joint_training."""
    if not ref.is_dir():
        raise ParityError(
            f"--reference {str(ref)!r}: no such directory. Get the reference with: {HOW_TO_GET}"
        )
    missing = [f for f in REQUIRED_FILES if not (ref / f).is_file()]
    if missing:
        raise ParityError(
            f"--reference {str(ref)!r} is not a checkout of boingkiri/joint_training "
            f"(missing {', '.join(missing)}). Get it with: {HOW_TO_GET}"
        )


def _install_stubs() -> list[str]:
    """Stub the reference's math-irrelevant imports that are not installed (module docstring)."""
    stubbed = []
    if importlib.util.find_spec("omegaconf") is None:
        omegaconf = types.ModuleType("omegaconf")
        omegaconf.DictConfig = dict
        sys.modules["omegaconf"] = omegaconf
        stubbed.append("omegaconf")
    if importlib.util.find_spec("einops") is None:
        einops = types.ModuleType("einops")

        def rearrange(*args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("einops is stubbed by tools/reference_parity.py")

        einops.rearrange = rearrange
        sys.modules["einops"] = einops
        stubbed.append("einops")
    return stubbed


def import_reference(ref: Path) -> types.SimpleNamespace:
    """Import the reference's network and EMA modules from `ref` (put first on sys.path)."""
    for top in ("model", "utils", "framework"):
        mod = sys.modules.get(top)
        if mod is not None and not any(
            str(p).startswith(str(ref)) for p in getattr(mod, "__path__", [])
        ):
            raise ParityError(f"a module named {top!r} is already imported from elsewhere: {mod}")
    stubbed = _install_stubs()
    sys.path.insert(0, str(ref))
    try:
        import model.ct.ncsnpp as ncsnpp  # the reference's, from `ref`
        import model.unetpp as unetpp
        import utils.ema.ema_cm as ema_cm
    except Exception as e:  # any import failure is the same user-facing error
        raise ParityError(
            f"importing the reference from {str(ref)!r} failed: {type(e).__name__}: {e} "
            f"(stubbed: {', '.join(stubbed) or 'nothing'}; see this tool's docstring)"
        ) from e
    for name, mod in (("model.unetpp", unetpp), ("utils.ema.ema_cm", ema_cm)):
        if not str(mod.__file__).startswith(str(ref)):
            raise ParityError(f"{name} was imported from {mod.__file__}, not from {ref}")
    return types.SimpleNamespace(unetpp=unetpp, ncsnpp=ncsnpp, ema_cm=ema_cm, stubbed=stubbed)


def reference_config(ref: Path, size: Size, vanilla: bool) -> AttrDict:
    """The reference's composed config (configs/config.yaml's defaults) with `size` applied."""
    import yaml

    def load(rel: str) -> dict:
        with open(ref / "configs" / rel) as f:
            return yaml.safe_load(f)

    cfg = {
        "framework": {"diffusion": load("framework/diffusion/cm_diffusion.yaml")},
        "model": {
            "diffusion": load("model/diffusion/original_ict.yaml"),
            "head": load("model/diffusion/score_head.yaml"),
        },
        "ema": load("ema/ema_ict.yaml"),
    }
    if vanilla:  # config_vanilla.yaml: framework.diffusion.gradient_flow_from_head = False
        cfg["framework"] = _merge(cfg["framework"], load("config_vanilla.yaml")["framework"])
    cfg["model"]["diffusion"] = _merge(
        cfg["model"]["diffusion"], dict(size.ref_backbone, dropout=0.0)
    )
    cfg["model"]["head"] = _merge(cfg["model"]["head"], dict(size.ref_head, dropout_rate=0.0))
    return _attrdict(cfg)


_FRAMEWORK_TARGETS = (
    "diffusion_framework",
    "model_config",
    "model_type",
    "head_config",
    "head_type",
    "self.head_type",
    "self.model",
    "self.head",
    "self.n_timestep",
    "self.sigma_min",
    "self.sigma_max",
    "self.rho",
    "self.mu_0",
    "self.s_0",
    "self.s_1",
    "k_prime",
    "self.ict_maximum_step_fn",
    "self.ict_t_steps_fn",
)
_FRAMEWORK_FUNCTIONS = (
    "ict_sigma_sampling_fn",
    "get_sigma_sampling",
    "pseudo_huber_loss_fn",
    "get_loss",
    "joint_training_loss_fn",
)


def _target_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


class _PinnedRandom:
    """jax.random with `normal` and `choice` pinned to given values (the module docstring)."""

    def __init__(self) -> None:
        self.normal_value = None
        self.choice_value = None
        self.choice_p = None

    def normal(self, key: Any, shape: Sequence[int], *args: Any, **kwargs: Any) -> Any:
        if tuple(shape) != tuple(self.normal_value.shape):
            raise ParityError(
                f"the reference drew noise of shape {tuple(shape)}, the pinned noise has "
                f"{tuple(self.normal_value.shape)}"
            )
        return self.normal_value

    def choice(
        self, key: Any, a: Any, shape: Sequence[int] = (), replace: bool = True, p: Any = None
    ) -> Any:
        import jax.numpy as jnp

        self.choice_p = p
        return jnp.take(a, self.choice_value)

    def __getattr__(self, name: str) -> Any:
        import jax

        return getattr(jax.random, name)


class _JaxWithPinnedRandom:
    def __init__(self, random: _PinnedRandom) -> None:
        self.random = random

    def __getattr__(self, name: str) -> Any:
        import jax

        return getattr(jax, name)


def load_reference_framework(
    ref: Path, modules: types.SimpleNamespace, cfg: AttrDict
) -> tuple[types.SimpleNamespace, dict, _PinnedRandom]:
    """Execute the needed parts of the reference's CMFramework.__init__ (see the docstring).

    Returns (self stand-in with model/head/sigma grid, namespace with the loss functions, the
    pinned random module)."""
    path = ref / "framework/diffusion/consistency_framework.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    cls = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CMFramework"]
    init = [
        n for c in cls for n in c.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"
    ]
    if len(init) != 1:
        raise ParityError(f"{path}: no CMFramework.__init__")
    body, found = [], set()
    for stmt in init[0].body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name in _FRAMEWORK_FUNCTIONS:
            body.append(stmt)
            found.add(stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names = [_target_name(t) for t in targets]
            if any(n in _FRAMEWORK_TARGETS for n in names):
                body.append(stmt)
                found.update(names)
    missing = set(_FRAMEWORK_TARGETS + _FRAMEWORK_FUNCTIONS) - found
    if missing:
        raise ParityError(f"{path}: CMFramework.__init__ lacks {sorted(missing)}")
    import jax.numpy as jnp

    random = _PinnedRandom()
    ns = {
        "__builtins__": builtins,
        "jax": _JaxWithPinnedRandom(random),
        "jnp": jnp,
        "DictConfig": AttrDict,
        "CMPrecond": modules.unetpp.CMPrecond,
        "ScoreDistillPrecond": modules.unetpp.ScoreDistillPrecond,
        "config": cfg,
        "self": types.SimpleNamespace(),
    }
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)
    return ns["self"], ns, random


# ------------------------------------------------------------------------------ parameter mapping


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


# ------------------------------------------------------------------------------ comparisons


def rel_diff(got: Any, want: Any) -> float:
    """||got - want|| / ||want|| over all elements (0 if equal; inf if want is 0 and got is not)."""
    import numpy as np

    g = np.asarray(got, np.float64).ravel()
    w = np.asarray(want, np.float64).ravel()
    if g.shape != w.shape:
        raise ParityError(f"comparing arrays of shapes {g.shape} and {w.shape}")
    d = float(np.linalg.norm(g - w))
    n = float(np.linalg.norm(w))
    if d == 0.0:
        return 0.0
    return d / n if n > 0 else math.inf


def tree_rel(got: Any, want: Any) -> tuple[float, float, str]:
    """(relative L2 of the whole tree, worst leaf's relative L2, that leaf's path)."""
    import jax
    import numpy as np

    g = {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in _flat(got)}
    w = {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in _flat(want)}
    if set(g) != set(w):
        raise ParityError(f"gradient trees differ: {sorted(set(g) ^ set(w))}")
    num = math.sqrt(sum(float(np.sum((g[k] - w[k]) ** 2)) for k in w))
    den = math.sqrt(sum(float(np.sum(w[k] ** 2)) for k in w))
    worst, worst_key = 0.0, ""
    for k in sorted(w):
        r = rel_diff(g[k], w[k])
        if r > worst:
            worst, worst_key = r, k
    return (num / den if den > 0 else (0.0 if num == 0 else math.inf)), worst, worst_key


def _flat(tree: Any) -> list:
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _norm_l2(tree: Any) -> float:
    import numpy as np

    return math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for _, v in _flat(tree)))


def _git_head(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_dirty(path: Path, *paths: str) -> bool | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--", *paths],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


# ------------------------------------------------------------------------------ the measurement


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


Record = Callable[..., None]


def check_sigmas(st: Setup, record: Record) -> dict:
    """p(i), the grid, the loss's sigma pair (the reference's ict_sigma_sampling_fn on the same
    indices) and the curriculum N(k)."""
    import jax.numpy as jnp
    import numpy as np

    from jcdm.ict import schedules

    cfg, n = st.cfg["joint"], st.num_scales
    grid = dict(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
    rself, ns, pinned = st.ref_fw["joint"]
    pinned.choice_value = st.idx
    ref_hi, ref_lo = ns["get_sigma_sampling"]("iCT", st.key, st.y, jnp.asarray(STEP))
    p_ref = np.asarray(pinned.choice_p)
    p_jcdm = schedules.index_probs(n, cfg.p_mean, cfg.p_std, **grid)
    record("sigma p(i) at N(k)", rel_diff(p_jcdm, p_ref[: n - 1]))
    record("sigma p(i) beyond N(k)-1 (max)", float(np.max(np.abs(p_ref[n - 1 :]))), 0.0)
    grid_ref = rself.ict_t_steps_fn(jnp.arange(n), n)
    record("sigma grid", rel_diff(schedules.karras_sigmas(n, **grid), grid_ref))
    record("sigma pair (student)", rel_diff(st.sigma_hi, ref_hi))
    record("sigma pair (teacher)", rel_diff(st.sigma_lo, ref_lo))
    n_ref = [int(rself.ict_maximum_step_fn(cur_step=k)) for k in CURRICULUM_STEPS]
    n_jcdm = [schedules.num_scales(k, st.total_steps, cfg.s0, cfg.s1) for k in CURRICULUM_STEPS]
    unequal = sum(a != b for a, b in zip(n_ref, n_jcdm))
    record("curriculum N(k) (count of unequal)", float(unequal), 0.0)
    return {"steps": list(CURRICULUM_STEPS), "jcdm": n_jcdm, "reference": n_ref}


def check_forward(st: Setup, record: Record) -> None:
    """The backbones and heads on identical weights and inputs (train=False)."""
    import jax

    from jcdm.ict import objective, parameterization

    nets, cfg, rself = st.nets, st.cfg["joint"], st.ref_fw["joint"][0]
    sig = st.sigma_hi
    x_sig = st.y + parameterization.expand(sig, 4) * st.z
    c_in = parameterization.expand(parameterization.consistency_scalings(sig, cfg.sigma_min)[2], 4)
    x_in, c_noise = c_in * x_sig, parameterization.c_noise(sig)
    ref_ncsnpp = st.modules.ncsnpp.NCSNpp(dict(st.ref_cfg["joint"].model.diffusion))

    def ref_head_raw(m: Any, x: Any, cn: Any, f_in: Any, feat: Any, temb: Any) -> Any:
        # ScoreDistillPrecond.__call__'s "unetpp" branch without its scalings
        # (model/unetpp.py L905-914).
        feat = m.layer_norm_for_last_x_emb(feat)
        temb = m.layer_norm_for_t_emb(temb)
        return m.head(x, cn, f_in, feat, temb, False)

    @jax.jit
    def run(rp: dict, p: dict) -> dict:
        out = {}
        out["F"] = (
            nets.backbone_apply(p["backbone"], x_in, c_noise, None),
            ref_ncsnpp.apply({"params": rp["torso_state"]["NCSNpp_0"]}, x_in, c_noise, False),
        )
        f, temb, feat = objective.consistency_fn(
            nets.backbone_apply, p["backbone"], x_sig, sig, cfg
        )
        sig4 = sig[:, None, None, None]
        out["f"] = (
            f,
            rself.model.apply(
                {"params": rp["torso_state"]},
                x=x_sig,
                sigma=sig4,
                train=False,
                augment_labels=None,
            )[0],
        )
        # The heads on identical inputs: jcdm's f, feature and temb.
        out["D"] = (
            objective.head_denoiser(nets.head_apply, p["head"], x_sig, sig, f, feat, temb, cfg),
            rself.head.apply(
                {"params": rp["head_state"]},
                x=x_sig,
                sigma=sig4,
                F_x=jax.lax.stop_gradient(f),
                t_emb=temb,
                last_x_emb=feat,
                augment_labels=None,
                train=False,
            )[0],
        )
        f_in = c_in * f
        out["head"] = (
            nets.head_apply(p["head"], x_in, c_noise, f_in, feat, temb, None),
            rself.head.apply(
                {"params": rp["head_state"]},
                x_in,
                c_noise[:, None, None, None],
                f_in,
                feat,
                temb,
                method=ref_head_raw,
            ),
        )
        return out

    o = jax.device_get(run(st.ref_params, st.params))
    (j_raw, j_temb, j_feat), (r_raw, r_temb, r_feat) = o["F"]
    record("backbone F (raw NCSN++ output)", rel_diff(j_raw, r_raw))
    record("backbone temb", rel_diff(j_temb, r_temb))
    record("backbone feature (last_x_emb)", rel_diff(j_feat, r_feat))
    record("consistency f = c_skip x + c_out F", rel_diff(*o["f"]))
    record("head raw output", rel_diff(*o["head"]))
    record("head denoiser D", rel_diff(*o["D"]))


def check_losses(st: Setup, record: Record) -> tuple[dict, dict]:
    """The joint loss, its terms and gradients in both modes, and the grad-norm ratio."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jcdm.ict import objective

    def jcdm_loss(p: dict, cfg: Any) -> tuple:
        return objective.joint_loss(
            p,
            st.y,
            st.key,
            STEP,
            backbone=st.nets.backbone_apply,
            head=st.nets.head_apply,
            cfg=cfg,
            total_steps=st.total_steps,
        )

    def ref_loss(rp: dict, z: Any, idx: Any, mode: str) -> tuple:
        _, ns, pinned = st.ref_fw[mode]
        pinned.normal_value, pinned.choice_value = z, idx
        opt_state = types.SimpleNamespace(gradient_step=jnp.asarray(STEP, jnp.float32))
        states = {"torso_state": types.SimpleNamespace(opt_state=opt_state)}
        return ns["joint_training_loss_fn"](rp, states, (st.y, st.key))

    modes, backbone_norms = {}, {}
    for mode in MODES:
        cfg = st.cfg[mode]
        jg = jax.jit(jax.value_and_grad(functools.partial(jcdm_loss, cfg=cfg), has_aux=True))
        rg = jax.jit(jax.value_and_grad(functools.partial(ref_loss, mode=mode), has_aux=True))
        (j_loss, j_m), j_g = jax.device_get(jg(st.params))
        (r_loss, r_m), r_g = jax.device_get(rg(st.ref_params, st.z, st.idx))
        if not np.allclose(j_m["sigma_mean"], np.mean(st.sigma_hi), rtol=1e-6, atol=0):
            raise ParityError(
                "this tool's replica of joint_loss's sigma draw no longer matches "
                "jcdm.ict.objective.joint_loss (did its key splitting change?)"
            )
        r_g = st.to_jcdm(r_g)
        terms = {
            "loss": (float(j_loss), float(r_loss)),
            "consistency term": (
                float(j_m["loss_ct"]),
                float(r_m[f"train/{st.ref_cfg[mode].framework.diffusion['loss']}"]),
            ),
            "0.3 x head DSM term": (
                float(cfg.joint_weight * j_m["loss_dsm"]),
                float(r_m["train/head_dsm_loss"]),
            ),
        }
        for name, (a, b) in terms.items():
            record(f"{mode}: {name}", rel_diff(a, b))
        whole, worst, worst_leaf = tree_rel(j_g, r_g)
        record(f"{mode}: gradient, whole tree (relative L2)", whole)
        record(
            f"{mode}: gradient, backbone (relative L2)",
            tree_rel(j_g["backbone"], r_g["backbone"])[0],
        )
        record(f"{mode}: gradient, head (relative L2)", tree_rel(j_g["head"], r_g["head"])[0])
        record(f"{mode}: gradient, worst single leaf", worst, note=worst_leaf)
        backbone_norms[mode] = (_norm_l2(j_g["backbone"]), _norm_l2(r_g["backbone"]))
        modes[mode] = {
            "reference_gradient_flow_from_head": bool(
                st.ref_cfg[mode].framework.diffusion["gradient_flow_from_head"]
            ),
            **{name: {"jcdm": a, "reference": b} for name, (a, b) in terms.items()},
            "backbone_grad_norm": dict(zip(("jcdm", "reference"), backbone_norms[mode])),
            "head_grad_norm": {"jcdm": _norm_l2(j_g["head"]), "reference": _norm_l2(r_g["head"])},
        }
    ratio = {
        side: backbone_norms["joint"][i] / backbone_norms["vanilla"][i]
        for i, side in enumerate(("jcdm", "reference"))
    }
    record("backbone grad-norm ratio joint/vanilla", rel_diff(ratio["jcdm"], ratio["reference"]))
    return modes, ratio


def check_ema(st: Setup, record: Record) -> dict:
    """The EMA decay of updates 1-6: the reference's CMEMA at gradient_step n (after the n-th
    update, consistency_framework.py L297-303) against jcdm's ema_decay_at(n - 1)."""
    import numpy as np

    from jcdm.ict import losses

    ema = st.modules.ema_cm.CMEMA(**st.ref_cfg["joint"].ema)
    ref = [float(np.float32(ema.get_current_decay(n))) for n in range(1, 7)]
    got = [float(losses.ema_decay_at(n - 1, st.ema_decay, st.ema_warmup)) for n in range(1, 7)]
    record(
        "EMA warm-up decays (count of unequal)", float(sum(a != b for a, b in zip(got, ref))), 0.0
    )
    return {"jcdm": got, "reference": ref}


def measure(ref: Path, size_name: str, tol: float, seed: int = 0) -> dict:
    """Build both models, run every comparison; returns the report (see the module docstring)."""
    st = build(ref, size_name, seed)
    import jax
    import numpy as np

    results: dict[str, dict] = {}

    def record(name: str, value: float, limit: float = tol, note: str = "") -> None:
        results[name] = {"rel_diff": value, "tol": limit, "ok": bool(value <= limit)}
        if note:
            results[name]["note"] = note

    curriculum = check_sigmas(st, record)
    check_forward(st, record)
    modes, ratio = check_losses(st, record)
    ema = check_ema(st, record)
    return {
        "tool": "tools/reference_parity.py",
        "date": datetime.date.today().isoformat(),
        "reference": {
            "dir": str(ref),
            "commit": _git_head(ref),
            "expected_commit": REFERENCE_COMMIT,
            "stubbed_imports": st.modules.stubbed,
        },
        "jcdm": {
            "commit": _git_head(REPO),
            "jcdm_or_gin_modified": _git_dirty(REPO, "jcdm", "gin"),
            "gin": "gin/reference.gin",
        },
        "config": {
            "size": size_name,
            "image": [st.size.image, st.size.image, 3],
            "batch": st.size.batch,
            "dtype": "float32",
            "platform": jax.default_backend(),
            "dropout": 0.0,
            "parameters": sum(int(np.prod(v.shape)) for _, v in _flat(st.params)),
            "parameters_backbone": sum(
                int(np.prod(v.shape)) for _, v in _flat(st.params["backbone"])
            ),
            "reference_backbone": dict(st.ref_cfg["joint"].model.diffusion),
            "reference_head": dict(st.ref_cfg["joint"].model.head),
            "jcdm_backbone": _module_fields(st.nets.backbone),
            "jcdm_head": _module_fields(st.nets.head),
            "jcdm_ict": dataclasses.asdict(st.cfg["joint"]),
            "step": STEP,
            "num_scales": st.num_scales,
            "sigma_student": [float(v) for v in np.asarray(st.sigma_hi)],
            "sigma_teacher": [float(v) for v in np.asarray(st.sigma_lo)],
            "seed": seed,
        },
        "tolerance": tol,
        "checks": results,
        "modes": modes,
        "grad_norm_ratio_joint_over_vanilla": ratio,
        "ema_warmup_decays": ema,
        "curriculum": curriculum,
        "ok": all(r["ok"] for r in results.values()),
    }


def _module_fields(m: Any) -> dict:
    out = {}
    for f in dataclasses.fields(m):
        if f.name in ("parent", "name"):
            continue
        v = getattr(m, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else (str(v) if f.name == "dtype" else v)
    return out


def format_report(rep: dict) -> str:
    c = rep["config"]
    lines = [
        f"reference_parity: jcdm {rep['jcdm']['gin']} vs boingkiri/joint_training "
        f"{(rep['reference']['commit'] or 'unknown commit')[:7]} ({rep['reference']['dir']})",
        f"config {c['size']}: {c['image'][0]}x{c['image'][1]}x3, batch {c['batch']}, "
        f"{c['parameters']:,} parameters, {c['dtype']} on {c['platform']}, dropout 0, "
        f"step {c['step']} (N = {c['num_scales']})",
        f"{'quantity':<48} {'rel. diff':>10} {'tol':>8}",
    ]
    for name, r in rep["checks"].items():
        flag = "ok" if r["ok"] else "FAIL"
        note = f"  [{r['note']}]" if r.get("note") else ""
        lines.append(f"{name:<48} {r['rel_diff']:>10.2e} {r['tol']:>8.0e}  {flag}{note}")
    ratio = rep["grad_norm_ratio_joint_over_vanilla"]
    lines.append(
        f"backbone grad-norm ratio joint/vanilla: jcdm {ratio['jcdm']:.6f}, "
        f"reference {ratio['reference']:.6f}"
    )
    ema = rep["ema_warmup_decays"]
    lines.append(f"EMA decays of updates 1-6: jcdm {ema['jcdm']}, reference {ema['reference']}")
    failed = [k for k, r in rep["checks"].items() if not r["ok"]]
    if failed:
        lines.append(f"FAIL: {len(failed)} difference(s) above tolerance: {', '.join(failed)}")
    else:
        lines.append(f"PASS: every difference within tolerance (relative {rep['tolerance']:.0e})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reference_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference", required=True, help="checkout of boingkiri/joint_training at b3bc451"
    )
    parser.add_argument("--out", help="also write the report as JSON to this file")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="small: 16x16, nf 32 (3 min on 2 CPU cores); cifar: the CIFAR-10 networks",
    )
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL, help="relative tolerance")
    parser.add_argument("--seed", type=int, default=0, help="weights, images and noise")
    args = parser.parse_args(argv)
    ref = Path(args.reference).expanduser().resolve()
    try:
        check_reference_dir(ref)
        commit = _git_head(ref)
        if commit is not None and commit != REFERENCE_COMMIT:
            print(
                f"reference_parity: warning: {ref} is at {commit[:7]}, not b3bc451",
                file=sys.stderr,
            )
        report = measure(ref, args.size, args.tol, args.seed)
    except ParityError as e:
        print(f"reference_parity: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return 0 if report["ok"] else 1


def _json_default(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v)}")


if __name__ == "__main__":
    sys.exit(main())

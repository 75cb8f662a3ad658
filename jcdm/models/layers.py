"""Building blocks shared by NCSN++ and the score head (docs/recipe.md sections 1 and 2).

Layer definitions follow NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
appendix H) as used by iCT (Song & Dhariwal 2023): DDPM initialisation (variance scaling, fan_avg,
uniform), GroupNorm with min(C // 4, 32) groups, swish, BigGAN residual blocks with FIR resampling,
and single-head channel attention.

Precision policy: parameters are always float32; convolutions, dense layers and attention matmuls
run in the module's ``dtype`` (e.g. bfloat16); GroupNorm statistics, attention softmax and the
Fourier embedding run in float32, because these reductions / large-argument sines lose too much
in bfloat16.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcdm.models import fir

Dtype = Any
_INV_SQRT2 = float(1.0 / np.sqrt(2.0))


def as_dtype(dtype: Dtype) -> jnp.dtype:
    """A module's compute dtype; strings allowed, so a .gin file can say `dtype = 'bfloat16'`."""
    return jnp.dtype(dtype)


def residual(x: jax.Array, h: jax.Array, skip_rescale: bool) -> jax.Array:
    """x + h, scaled by 1/sqrt(2) with ``skip_rescale`` (NCSN++) to keep the variance of a sum
    of two unit-variance branches at one."""
    return (x + h) * _INV_SQRT2 if skip_rescale else x + h


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """DDPM initialiser; ``scale == 0`` gives exact zeros (NCSN++ ``init_scale = 0``).

    The reference maps 0 to 1e-10, i.e. weights of order 1e-6; exact zeros make "the residual
    branch / the network output is zero at initialisation" hold exactly rather than approximately.
    """
    if scale == 0.0:
        return nn.initializers.zeros
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def conv(
    x: jax.Array,
    features: int,
    kernel: int = 3,
    *,
    init_scale: float = 1.0,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> jax.Array:
    """Stride-1 'SAME' NHWC convolution with DDPM init and zero bias (call inside nn.compact)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        padding="SAME",
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x)


def dense(
    x: jax.Array,
    features: int,
    *,
    init_scale: float = 1.0,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> jax.Array:
    """Dense layer with DDPM init and zero bias (call inside nn.compact)."""
    return nn.Dense(
        features,
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x)


def group_norm(x: jax.Array, name: str | None = None, groups: int | None = None) -> jax.Array:
    """GroupNorm, statistics in float32, output in x.dtype.

    ``groups`` None: min(C // 4, 32) groups (NCSN++); the reference's score head always uses 32
    (Flax's default), the same count whenever C >= 128 (docs/recipe.md section 2).
    """
    c = x.shape[-1]
    groups = min(c // 4, 32) if groups is None else groups
    if groups < 1 or c % groups:
        raise ValueError(
            f"GroupNorm: {c} channels do not split into {groups} groups; choose a group count "
            "that divides the channel count (e.g. ScoreHead.norm_groups = None)"
        )
    y = nn.GroupNorm(
        num_groups=groups,
        epsilon=1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name=name,
    )(x.astype(jnp.float32))
    return y.astype(x.dtype)


def _stacked_init(n: int, scale: float) -> nn.initializers.Initializer:
    """Init an [in, n*out] kernel as n independent [in, out] DDPM kernels.

    Fusing q/k/v into one matmul must not change the init: fan_avg of [C, 3C] differs from that of
    three [C, C] projections (NCSN++ ``NIN`` layers, init_scale 0.1).
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        fan_in, fan_out = shape[0], shape[1] // n
        keys = jax.random.split(key, n)
        parts = [default_init(scale)(k, (fan_in, fan_out), dtype) for k in keys]
        return jnp.concatenate(parts, axis=-1)

    return init


class GaussianFourierEmbedding(nn.Module):
    """Fourier features [sin(2 pi W c), cos(2 pi W c)], W ~ N(0, scale^2) frozen (NCSN++).

    iCT uses scale 0.02 (not 16) because c_noise = ln(sigma)/4 is O(1) (docs/recipe.md section 1).
    """

    embedding_size: int = 128
    scale: float = 0.02

    @nn.compact
    def __call__(self, c_noise: jax.Array) -> jax.Array:
        w = self.param("W", nn.initializers.normal(self.scale), (self.embedding_size,), jnp.float32)
        # Frozen random features: the optimiser must not move them (the reference stop-gradients W).
        w = jax.lax.stop_gradient(w)
        proj = c_noise.astype(jnp.float32)[:, None] * w[None, :] * (2.0 * np.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def positional_embedding(c_noise: jax.Array, dim: int, max_positions: int = 10000) -> jax.Array:
    """Transformer sinusoidal embedding [sin, cos] with endpoint frequencies (EDM / DDPM++).

    Frequencies (1/max_positions)^(i/(dim/2 - 1)), i = 0..dim/2-1, so the lowest is exactly 1.
    """
    half = dim // 2
    freqs = (1.0 / max_positions) ** (np.arange(half, dtype=np.float32) / max(half - 1, 1))
    proj = c_noise.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


ATTN_IMPLS = ("einsum", "xla", "cudnn")


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels with a residual connection (NCSN++ AttnBlockpp).

    q/k/v are one fused [C, 3C] matmul; the output projection uses ``init_scale`` (0 -> the block
    is the identity, up to skip_rescale, at initialisation). ``impl``: 'einsum' (two einsums and
    a float32 softmax), or `jax.nn.dot_product_attention` with implementation 'xla' or 'cudnn'
    (flash attention, GPU only): the same function, possibly faster kernels.
    """

    skip_rescale: bool = True
    init_scale: float = 0.0
    norm_groups: int | None = None  # None: min(C // 4, 32) (see group_norm)
    impl: str = "einsum"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.impl not in ATTN_IMPLS:
            raise ValueError(
                f"attention impl must be one of {ATTN_IMPLS}, got {self.impl!r}: set ATTN_IMPL "
                "(gin/joint.gin) or NCSNpp.attn_impl / ScoreHead.attn_impl to one of them"
            )
        b, hgt, wid, c = x.shape
        h = group_norm(x, groups=self.norm_groups)
        qkv = nn.Dense(
            3 * c,
            kernel_init=_stacked_init(3, 0.1),
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="qkv",
        )(h)
        q, k, v = jnp.split(qkv.reshape(b, hgt * wid, 3 * c), 3, axis=-1)
        if self.impl == "einsum":
            logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
            attn = jax.nn.softmax(logits * (c**-0.5), axis=-1).astype(self.dtype)
            h = jnp.einsum("bqk,bkc->bqc", attn, v)
        else:  # [B, T, heads=1, C]; the default scale is C^-1/2 as above
            q, k, v = (a[:, :, None, :] for a in (q, k, v))
            h = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)[:, :, 0, :]
        h = dense(
            h.reshape(b, hgt, wid, c), c, init_scale=self.init_scale, dtype=self.dtype, name="proj"
        )
        return residual(x, h, self.skip_rescale)


class ResBlockBigGAN(nn.Module):
    """BigGAN-style residual block with optional FIR up/down sampling (NCSN++ ResnetBlockBigGANpp).

    GN-swish-[resample]-conv3x3 (+ Dense(swish(temb))) - GN-swish-dropout-conv3x3(init_scale);
    the shortcut is resampled and 1x1-projected when the shape changes. Dropout draws from the
    'dropout' rng and is active only when ``train``. ``temb_act=False`` adds Dense(temb) instead:
    the score head's blocks, whose embedding is already a linear layer's output meant to be used
    as is (the reference's EDM ``UNetBlock``, model/unetpp.py L195; docs/recipe.md section 2).
    ``norm_groups``: see `group_norm`.
    """

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    fir_kernel: Sequence[float] = (1, 3, 3, 1)
    fir_impl: str = "separable"  # jcdm.models.fir.IMPLS: same values, different kernels
    skip_rescale: bool = True
    init_scale: float = 0.0
    temb_act: bool = True
    norm_groups: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, train: bool) -> jax.Array:
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = nn.silu(group_norm(x, groups=self.norm_groups))
        k, impl = self.fir_kernel, self.fir_impl
        if self.up:
            h = fir.upsample_2d(h, k, impl=impl)
            x = fir.upsample_2d(x, k, impl=impl)
        elif self.down:
            h = fir.downsample_2d(h, k, impl=impl)
            x = fir.downsample_2d(x, k, impl=impl)
        h = conv(h, out_ch, dtype=self.dtype)
        if temb is not None:
            emb = nn.silu(temb) if self.temb_act else temb
            h = h + dense(emb, out_ch, dtype=self.dtype)[:, None, None, :]
        h = nn.silu(group_norm(h, groups=self.norm_groups))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
        if c != out_ch or self.up or self.down:
            x = conv(x, out_ch, kernel=1, dtype=self.dtype)
        return residual(x, h, self.skip_rescale)


class ResBlockDDPM(nn.Module):
    """DDPM++ residual block without resampling (NCSN++ ResnetBlockDDPMpp).

    Resampling is done by separate FIRConv layers when ``resblock_type == 'ddpm'``; the shortcut
    is a 1x1 projection (NIN, init scale 0.1) when the channel count changes.
    """

    out_ch: int | None = None
    dropout: float = 0.0
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, train: bool) -> jax.Array:
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = conv(nn.silu(group_norm(x)), out_ch, dtype=self.dtype)
        if temb is not None:
            h = h + dense(nn.silu(temb), out_ch, dtype=self.dtype)[:, None, None, :]
        h = nn.silu(group_norm(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
        if c != out_ch:
            x = dense(x, out_ch, init_scale=0.1, dtype=self.dtype, name="nin")
        return residual(x, h, self.skip_rescale)


class FIRConv(nn.Module):
    """kxk convolution fused with FIR up- or down-sampling by 2 (NCSN++ ``up_or_down_sampling``).

    Used for the input pyramid (progressive_input='residual'), the output pyramid
    (progressive='residual') and the resampling layers of resblock_type='ddpm'.
    """

    features: int
    mode: str  # 'up' | 'down'
    kernel_size: int = 3
    fir_kernel: Sequence[float] = (1, 3, 3, 1)
    fir_impl: str = "separable"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        w = self.param("kernel", default_init(), shape, jnp.float32)
        b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        if self.mode == "down":
            y = fir.conv_downsample_2d(x, w, self.fir_kernel, impl=self.fir_impl)
        elif self.mode == "up":
            y = fir.upsample_conv_2d(x, w, self.fir_kernel, impl=self.fir_impl)
        else:
            raise ValueError(f"FIRConv mode must be 'up' or 'down', got {self.mode!r}")
        return y + b.astype(self.dtype)

"""Score head: a small U-Net denoiser on top of the NCSN++ backbone (RECIPE.md section 2).

The head outputs the raw network output F_head of an EDM-preconditioned denoiser
D(x_sigma, sigma) = c_skip x_sigma + c_out F_head(...) (Karras et al. 2022, Table 1); the caller
applies c_skip / c_out (``jcdm.ict.parameterization.edm_scalings``) and decides whether the backbone
inputs are detached ("vanilla") or not ("joint").

Inputs and fusion:
  * x = c_in * x_sigma and f_in = c_in * stop_gradient(f(x_sigma, sigma)) are concatenated with a
    LayerNorm-ed copy of the backbone's last feature map ``feat`` (same spatial size as x) and
    mixed by a 3x3 conv to ``fuse_channels`` (default nf * ch_mult[0], like the reference's
    input conv; 0 skips it) and swish, then a 3x3 stem conv to nf channels;
  * the head embeds c_noise itself (sinusoidal by default, like EDM's DDPM++) through a 2-layer MLP,
    then fuses it with a LayerNorm-ed copy of the backbone time embedding ``temb`` by a dense layer
    over their concatenation.
LayerNorm keeps the head's input scale fixed while the backbone's features drift during joint
training. ``feat`` is normalised over (H, W, C) jointly, so the spatial pattern of feature
magnitudes - which a per-pixel norm would erase - reaches the head.

U-Net layout (the reference project's default head: 128 channels, ch_mult (2, 2, 2), one residual
block per level, attention at the middle level and in the bottleneck, no dropout, box-filter
resampling): encoder level i has a downsampling block (i > 0) then ``num_res_blocks`` blocks;
bottleneck block-attention-block; decoder level i has ``num_res_blocks + 1`` blocks on
concatenated skips, attention after the level's last block at ``attn_resolutions``, then an
upsampling block; GroupNorm-swish-conv3x3 (zero init) out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from jcdm.models.layers import (
    AttnBlock,
    GaussianFourierEmbedding,
    ResBlockBigGAN,
    conv,
    dense,
    group_norm,
    positional_embedding,
)


@gin.configurable(module="jcdm.models", denylist=["parent", "name"])
class ScoreHead(nn.Module):
    """U-Net score head returning the raw denoiser output F_head [B, H, W, out_channels] (float32).

    ``__call__(x, c_noise, f_in, feat, temb, *, train)``:
      x: [B, H, W, C] c_in * x_sigma;   c_noise: [B] ln(sigma) / 4;
      f_in: [B, H, W, C] c_in * stop_gradient(consistency output);
      feat: [B, H, W, F] backbone last feature map;   temb: [B, T] backbone time embedding.
    """

    nf: int = 128
    ch_mult: Sequence[int] = (2, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.0
    resample_kernel: Sequence[float] = (1, 1)
    fir_impl: str = "separable"  # 'conv' | 'separable' (jcdm.models.fir): same values
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    fuse_channels: int | None = None
    skip_rescale: bool = True
    init_scale: float = 0.0
    image_size: int = 32
    out_channels: int = 3
    dtype: Any = jnp.float32

    @property
    def _dt(self) -> jnp.dtype:
        # Accept strings so a .gin file can say `dtype = 'bfloat16'`.
        return jnp.dtype(self.dtype)

    def _embed(self, c_noise: jax.Array, temb: jax.Array) -> jax.Array:
        if self.embedding_type == "positional":
            emb = positional_embedding(c_noise, self.nf)
        elif self.embedding_type == "fourier":
            emb = GaussianFourierEmbedding(self.nf // 2, self.fourier_scale)(c_noise)
        else:
            raise ValueError(f"unknown embedding_type {self.embedding_type!r}")
        emb = dense(emb, 4 * self.nf, dtype=self._dt)
        emb = dense(nn.silu(emb), 4 * self.nf, dtype=self._dt)
        t = nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32, name="temb_norm")(
            temb.astype(jnp.float32)
        )
        fused = jnp.concatenate([nn.silu(emb), t.astype(self._dt)], axis=-1)
        # Pre-activation output: every residual block applies swish before its own projection.
        return dense(fused, 4 * self.nf, dtype=self._dt, name="temb_fuse")

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        c_noise: jax.Array,
        f_in: jax.Array,
        feat: jax.Array,
        temb: jax.Array,
        *,
        train: bool,
    ) -> jax.Array:
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of size {self.image_size}, got shape {x.shape}")
        if f_in.shape != x.shape:
            raise ValueError(f"f_in shape {f_in.shape} must equal x shape {x.shape}")
        if feat.shape[:3] != x.shape[:3]:
            raise ValueError(
                f"feat {feat.shape} must share batch and spatial size with x {x.shape}"
            )
        dt, nf, levels = self._dt, self.nf, len(self.ch_mult)
        emb = self._embed(c_noise, temb)

        def block(h, **kw):
            return ResBlockBigGAN(
                dropout=self.dropout,
                fir_kernel=tuple(self.resample_kernel),
                fir_impl=self.fir_impl,
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                dtype=dt,
                **kw,
            )(h, emb, train)

        def attn(h):
            blk = AttnBlock(skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=dt)
            return blk(h)

        f = nn.LayerNorm(
            reduction_axes=(1, 2, 3),
            feature_axes=-1,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name="feat_norm",
        )(feat.astype(jnp.float32))
        h = jnp.concatenate([x.astype(dt), f_in.astype(dt), f.astype(dt)], axis=-1)
        fuse = nf * self.ch_mult[0] if self.fuse_channels is None else self.fuse_channels
        if fuse:
            h = nn.silu(conv(h, fuse, dtype=dt, name="fuse_conv"))
        hs = [conv(h, nf, dtype=dt, name="stem_conv")]

        h = hs[-1]
        for i_level in range(levels):
            if i_level > 0:
                h = block(h, down=True)
                hs.append(h)
            for _ in range(self.num_res_blocks):
                h = block(h, out_ch=nf * self.ch_mult[i_level])
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h)
                hs.append(h)

        h = attn(block(h))
        h = block(h)

        for i_level in reversed(range(levels)):
            if i_level < levels - 1:
                h = block(h, up=True)
            for _ in range(self.num_res_blocks + 1):
                h = block(
                    jnp.concatenate([h, hs.pop()], axis=-1), out_ch=nf * self.ch_mult[i_level]
                )
            if h.shape[1] in self.attn_resolutions:
                h = attn(h)
        assert not hs, "every skip connection must be consumed"

        out = conv(nn.silu(group_norm(h)), self.out_channels, init_scale=self.init_scale, dtype=dt)
        return out.astype(jnp.float32)

"""Score head: a small U-Net denoiser on top of the NCSN++ backbone (docs/recipe.md section 2).

The head is the reference project's (``UNetppHead`` inside ``ScoreDistillPrecond``,
boingkiri/joint_training b3bc451, model/unetpp.py L480-518 and L875-921). It returns the raw
output F_head of a denoiser D(x_sigma, sigma) = c_skip x_sigma + c_out F_head(...); the caller
applies the scalings (``jcdm.ict.objective.head_denoiser``: consistency-style by default, like the
reference) and decides whether the backbone inputs are detached ("vanilla") or not ("joint").

Inputs and fusion (``UNetppHead.__call__``, L514-518):
  * ``feat`` is the backbone's silu(GroupNorm(h)), the input of its output conv;
  * it is layer-normalised per pixel over channels (``nn.LayerNorm()`` on the last axis, L895,
    L905), then group-normalised (``normalize1``, L506, L515);
  * h = fuse_conv(silu(concat[c_in x_sigma, c_in stop_gradient(f), feat])): a 3x3 conv to
    ``fuse_channels`` (default nf * ch_mult[0]), fed straight into the U-Net's 3x3 stem conv to
    nf channels, with no activation in between.
Embedding (``UNetpp.__call__``, L422-441): the head embeds c_noise itself (sinusoidal by default),
silu(Dense), silu(Dense), then ``temb_fuse`` = Dense(concat[that, LayerNorm(temb)]) with no
activation; every block adds Dense(emb) to its first conv's output, with no activation on emb
(EDM ``UNetBlock`` with ``adaptive_scale=False``, L191-211).

U-Net layout (the reference's config, configs/model/diffusion/score_head.yaml: 128 channels,
ch_mult (2, 2, 2), one block per level, attention at 16x16 and in the bottleneck, no dropout,
box-filter [1, 1] resampling with 1x1 resampled shortcuts): encoder level i has a downsampling
block (i > 0) then ``num_res_blocks`` blocks; bottleneck block-attention-block; decoder level i
has ``num_res_blocks + 1`` blocks on concatenated skips, attention after the level's last block at
``attn_resolutions``, then an upsampling block; GroupNorm-swish-conv3x3 (zero init) out.
26,243,715 parameters at the CIFAR config (tests/test_models.py). The reference's GroupNorms
have 32 groups; ``norm_groups=None`` uses NCSN++'s min(C // 4, 32), the same for C >= 128 (every
layer at the CIFAR config) and valid for the small test models.
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
    as_dtype,
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
      feat: [B, H, W, F] the backbone's silu(GroupNorm(h)), its output conv's input;
      temb: [B, T] the backbone's time embedding.
    """

    nf: int = 128
    ch_mult: Sequence[int] = (2, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.0
    resample_kernel: Sequence[float] = (1, 1)
    fir_impl: str = "separable"  # 'conv' | 'separable' (jcdm.models.fir): same values
    attn_impl: str = "einsum"  # jcdm.models.layers.ATTN_IMPLS: same values
    embedding_type: str = "positional"
    fourier_scale: float = 16.0
    fuse_channels: int | None = None  # None: nf * ch_mult[0] (the reference's conv1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    norm_groups: int | None = None  # the reference: 32; None: min(C // 4, 32)
    image_size: int = 32
    out_channels: int = 3
    dtype: Any = jnp.float32

    @property
    def _dt(self) -> jnp.dtype:
        return as_dtype(self.dtype)

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
        # Linear output (the reference's map_noise_proj, model/unetpp.py L440): every block adds
        # its own projection of it, with no activation in between.
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
        fuse = self.nf * self.ch_mult[0] if self.fuse_channels is None else self.fuse_channels
        if fuse < 1:
            raise ValueError(f"ScoreHead.fuse_channels must be >= 1 or None, got {fuse}")
        dt, nf, levels = self._dt, self.nf, len(self.ch_mult)
        groups = self.norm_groups
        emb = self._embed(c_noise, temb)

        def block(h, **kw):
            return ResBlockBigGAN(
                dropout=self.dropout,
                fir_kernel=tuple(self.resample_kernel),
                fir_impl=self.fir_impl,
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                temb_act=False,
                norm_groups=groups,
                dtype=dt,
                **kw,
            )(h, emb, train)

        def attn(h):
            return AttnBlock(
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                norm_groups=groups,
                impl=self.attn_impl,
                dtype=dt,
            )(h)

        # Per-pixel LayerNorm over channels, then GroupNorm: float32 statistics.
        f = nn.LayerNorm(dtype=jnp.float32, param_dtype=jnp.float32, name="feat_norm")(
            feat.astype(jnp.float32)
        )
        f = group_norm(f, name="feat_group_norm", groups=groups)
        h = jnp.concatenate([x.astype(dt), f_in.astype(dt), f.astype(dt)], axis=-1)
        h = conv(nn.silu(h), fuse, dtype=dt, name="fuse_conv")
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

        h = nn.silu(group_norm(h, name="out_norm", groups=groups))
        out = conv(h, self.out_channels, init_scale=self.init_scale, dtype=dt, name="out_conv")
        return out.astype(jnp.float32)

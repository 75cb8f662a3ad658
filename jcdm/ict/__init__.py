"""`jcdm.ict`: the documented namespace of the method's math (docs/recipe.md).

Researchers import the schedule, parameterisation, loss and sampler functions from here::

    from jcdm import ict
    sigmas = ict.karras_sigmas(11)            # ascending, sigma_1 = 0.002 ... sigma_11 = 80
    n = ict.num_scales(150_000, 400_000)      # N(k) = 81
    p = ict.index_probs(n)                    # p(i), i = 1..N-1
    c_skip, c_out, c_in = ict.consistency_scalings(sigma)
    d = ict.pseudo_huber(a, b)                # per sample, c = 0.00054 sqrt(d)

Every function carries the paper's CIFAR-10 values as keyword defaults.
"""

from jcdm.ict.losses import (
    consistency_weight,
    default_huber_c,
    edm_weight,
    ema_decay_at,
    ema_update,
    pseudo_huber,
    pseudo_huber_per_pixel,
    weighted_mse,
)
from jcdm.ict.objective import ICTConfig, consistency_fn, head_denoiser, joint_loss
from jcdm.ict.parameterization import SIGMA_DATA, c_noise, consistency_scalings, edm_scalings
from jcdm.ict.sampling import TWO_STEP_SIGMA, consistency_sample, edm_heun_sample
from jcdm.ict.schedules import (
    curriculum_period,
    index_logits,
    index_probs,
    karras_sigma,
    karras_sigmas,
    num_scales,
    sample_sigma_pairs,
)

__all__ = [
    "ICTConfig",
    "SIGMA_DATA",
    "TWO_STEP_SIGMA",
    "c_noise",
    "consistency_fn",
    "consistency_sample",
    "consistency_scalings",
    "consistency_weight",
    "curriculum_period",
    "default_huber_c",
    "edm_heun_sample",
    "edm_scalings",
    "edm_weight",
    "ema_decay_at",
    "ema_update",
    "head_denoiser",
    "index_logits",
    "index_probs",
    "joint_loss",
    "karras_sigma",
    "karras_sigmas",
    "num_scales",
    "pseudo_huber",
    "pseudo_huber_per_pixel",
    "sample_sigma_pairs",
    "weighted_mse",
]

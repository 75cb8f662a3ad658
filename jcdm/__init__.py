"""jcdm: jointly training consistency and diffusion models (iCT + score head) in JAX/Flax."""

__version__ = "0.1.0"

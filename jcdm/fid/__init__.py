"""FID evaluation: the FID Inception-v3 in Flax, feature statistics and the Frechet distance."""

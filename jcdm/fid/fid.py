"""FID: streaming feature statistics, stats files, the Frechet distance, sharded Inception.

FID (Heusel et al. 2017) between Gaussians fitted to Inception pool_3 features:

    FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

All statistics are float64 on the host. The trainer's loop is

    fn = make_inception_fn(load_params(), mesh, jcdm.runtime.mesh.batch_sharding(mesh))
    stats = accumulate(fn, sample_batches)  # or: for x in batches: stats.update(fn(x))
    mu, sigma = stats.mean_cov()
    fid = frechet_distance(mu, sigma, *load_stats(reference_path))
"""

from __future__ import annotations

import io as stdlib_io
import math
import os
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jcdm.fid.inception import Params, Precision, inception_features
from jcdm.runtime import io

BATCH_AXES = ("data", "fsdp")


class FeatureStats:
    """Running mean and covariance of feature rows, accumulated in float64.

    Batches are merged with Chan et al.'s pairwise update (centred sums of squares), which keeps
    full float64 accuracy over 50k rows, unlike a raw sum of outer products.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    def update(self, features: Any) -> None:
        """Add a batch of features [N, D] (NumPy or a host-fetchable jax.Array)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D]; got shape {x.shape}")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"feature dim {x.shape[1]} != {self.dim} of earlier batches")
        if not np.isfinite(x).all():
            raise ValueError("non-finite features: the images or the Inception weights are broken")
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        if self.count == 0:
            self._mean, self._m2 = mean_b, m2_b
        else:
            total = self.count + n
            delta = mean_b - self._mean
            self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.count * n / total)
            self._mean = self._mean + delta * (n / total)
        self.count += n

    def merge(self, other: FeatureStats) -> None:
        """Fold another accumulator's rows into this one (e.g. stats of several shards)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.dim, self.count = other.dim, other.count
            self._mean, self._m2 = other._mean.copy(), other._m2.copy()
            return
        if other.dim != self.dim:
            raise ValueError(f"cannot merge feature dims {other.dim} and {self.dim}")
        total = self.count + other.count
        delta = other._mean - self._mean
        self._m2 = (
            self._m2 + other._m2 + np.outer(delta, delta) * (self.count * other.count / total)
        )
        self._mean = self._mean + delta * (other.count / total)
        self.count = total

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) with the unbiased (N - 1) covariance, as `np.cov` computes."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance; have {self.count}")
        return self._mean.copy(), self._m2 / (self.count - 1)


def accumulate(
    fn: Callable[[Any], Any], batches: Iterable[Any], stats: FeatureStats | None = None
) -> FeatureStats:
    """Run `fn` (e.g. from `make_inception_fn`) over `batches` and fold features into `stats`.

    One batch stays in flight: the device works on batch i + 1 while the host folds batch i.
    A batch may be an array or a (images, n_valid) pair whose rows past n_valid are padding.
    """
    stats = FeatureStats() if stats is None else stats
    pending = None
    for batch in batches:
        images, n_valid = batch if isinstance(batch, tuple) else (batch, None)
        out = (fn(images), n_valid)
        if pending is not None:
            stats.update(_valid_rows(*pending))
        pending = out
    if pending is not None:
        stats.update(_valid_rows(*pending))
    return stats


def _valid_rows(features: Any, n_valid: int | None) -> np.ndarray:
    x = np.asarray(features)
    return x if n_valid is None else x[:n_valid]


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, via symmetric eigendecompositions.

    With S1 = V diag(w) V^T and B = V diag(sqrt(w)), S1 S2 is similar to B^T S2 B (symmetric PSD),
    so its eigenvalues are real and non-negative and the trace of its square root is
    sum(sqrt(eig(B^T S2 B))). Unlike a general `sqrtm(S1 @ S2)` this never goes complex and
    stays accurate when the covariances are singular (fewer samples than feature dimensions);
    eigenvalues at round-off level count as zero, and zero directions of S1 are dropped from B
    (so a rank-r S1 costs O(d^2 r) after its eigendecomposition).
    """
    w, v = np.linalg.eigh(sigma1)
    w = _drop_roundoff(w)
    keep = w > 0
    b = v[:, keep] * np.sqrt(w[keep])
    m = b.T @ (sigma2 @ b)
    ev = np.linalg.eigvalsh((m + m.T) * 0.5)
    return float(np.sqrt(_drop_roundoff(ev)).sum())


def _drop_roundoff(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero eigenvalues below the float64 resolution of the largest one (and negatives).

    A singular covariance has ~d eigenvalues that come out as +-1e-16 * max instead of 0; their
    square roots (~1e-8 each) would add up to a visible FID offset over 2048 dimensions.
    """
    if eigenvalues.size == 0:
        return eigenvalues
    tol = eigenvalues.shape[0] * np.finfo(np.float64).eps * max(float(eigenvalues.max()), 0.0)
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, arr, shape in (
        ("mu1", mu1, (d,)),
        ("mu2", mu2, (d,)),
        ("sigma1", sigma1, (d, d)),
        ("sigma2", sigma2, (d, d)),
    ):
        if arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}; expected {shape} (mu1 is {mu1.shape})")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains non-finite values")
    # Accumulation leaves ~1e-16 asymmetry; eigh assumes exact symmetry.
    sigma1 = (sigma1 + sigma1.T) * 0.5
    sigma2 = (sigma2 + sigma2.T) * 0.5
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def save_stats(
    path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **metadata: Any
) -> epath.Path:
    """Write `mu`, `sigma` (float64) and scalar metadata (e.g. count=50000) to an .npz.

    The write is atomic (`jcdm.runtime.io`), so a preempted job never leaves half a file; `path`
    may be a bucket URL.
    """
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_stats(mu, sigma, "save_stats")
    reserved = {"mu", "sigma"} & set(metadata)
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved")
    meta = {}
    for k, v in metadata.items():
        arr = np.asarray(v)
        if arr.ndim != 0 or arr.dtype == object:
            raise ValueError(f"metadata {k}={v!r}: only scalars and strings are stored")
        meta[k] = arr
    return io.write_npz(_expand(path), mu=mu, sigma=sigma, **meta)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 from a stats .npz (ours, or any file with `mu` / `sigma` keys)."""
    path = _expand(path)
    if not io.exists(path):
        raise FileNotFoundError(
            f"FID statistics file {path} not found. Compute it with "
            "`python tools/fid_stats.py DATA_DIR --out STATS.npz`."
        )
    with _open_npz(path) as z:
        missing = {"mu", "sigma"} - set(z.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; keys are {z.files}")
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    _check_stats(mu, sigma, str(path))
    return mu, sigma


def load_stats_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The scalar metadata stored next to `mu` / `sigma` (empty for foreign files)."""
    with _open_npz(_expand(path)) as z:
        return {k: z[k].item() for k in z.files if k not in ("mu", "sigma") and z[k].ndim == 0}


def _expand(path: str | os.PathLike) -> epath.Path:
    """`~` expanded for local paths; bucket URLs as they are."""
    return io.path(os.path.expanduser(path) if io.is_local(path) else path)


def _open_npz(path: epath.Path):
    """np.load of a local or bucket .npz (read whole: stats files are a few tens of MB)."""
    return np.load(stdlib_io.BytesIO(io.read_bytes(path)), allow_pickle=False)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: mu {mu.shape} / sigma {sigma.shape} are not [D] / [D, D]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: statistics contain non-finite values")


def _batch_shards(sharding: NamedSharding) -> int:
    spec = sharding.spec
    first = spec[0] if len(spec) else None
    if first is None:
        return 1
    names = (first,) if isinstance(first, str) else tuple(first)
    return math.prod(sharding.mesh.shape[n] for n in names)


def make_inception_fn(
    params: Params,
    mesh: Mesh,
    batch_sharding: NamedSharding | None = None,
    *,
    quantize: bool = True,
    precision: Precision = Precision.HIGHEST,
) -> Callable[[Any], jax.Array]:
    """Jit Inception over all devices of `mesh`: fn(images [N, H, W, 3]) -> features [N, 2048].

    Images are sharded along the batch over `batch_sharding` (default: the mesh's "data" and
    "fsdp" axes); params are replicated once, here. Features come back fully replicated so any
    process can read them with `np.asarray` (they are small: 8 KiB per image). A host batch
    whose size does not divide the batch shards is padded and the padding dropped; a global
    jax.Array must already be divisible. `precision` defaults to HIGHEST so TPU/GPU matmuls do
    not silently fall to bf16 and move FID.
    """
    if batch_sharding is None:
        axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
        batch_sharding = NamedSharding(mesh, P(axes))
    if batch_sharding.mesh.shape != mesh.shape:
        raise ValueError("batch_sharding must be defined over the same mesh")
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    shards = _batch_shards(batch_sharding)
    jitted = jax.jit(
        partial(inception_features, quantize=quantize, precision=precision),
        in_shardings=(replicated, batch_sharding),
        out_shardings=replicated,
    )

    def fn(images: Any) -> jax.Array:
        n = images.shape[0]
        pad = -n % shards
        if pad:
            if isinstance(images, jax.Array) and not images.is_fully_addressable:
                raise ValueError(
                    f"global batch {n} does not divide the {shards} batch shards; "
                    f"use a multiple of {shards}"
                )
            images = np.asarray(images)
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        elif isinstance(images, jax.Array) and not images.sharding.is_equivalent_to(
            batch_sharding, images.ndim
        ):
            # e.g. samples left on one device: lay them out as jit's in_shardings demand.
            images = jax.device_put(images, batch_sharding)
        out = jitted(params, images)
        return out[:n] if pad else out

    return fn

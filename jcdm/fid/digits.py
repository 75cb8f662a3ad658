"""A feature network for the embedded digits: a quality metric that costs seconds, not minutes.

Inception FID needs about 2.5 minutes per 250 samples on 2 CPU cores, so the digits demo had no
quality number. This module trains a small CNN classifier on a fixed train split of
scikit-learn's 1,797 digits (16x16x1) and uses its 64-d penultimate layer as the feature space of
the same `FeatureStats` / `frechet_distance` code as Inception FID, plus what a Frechet distance
hides on a 10-class set:

* `fd`: Frechet distance of the samples' features to the train split's features;
* `classes`: how many classes receive at least `HIT_FRACTION` of the samples (argmax of the
  classifier), and `evenness`: the normalised entropy of the class histogram (1 = uniform);
* `nn_rms`: the median RMS pixel distance from each sample to its nearest training image (all
  1,797). 1,797 images can be memorised: copies sit near 0, while a held-out real digit lies
  `DigitsEvaluator.real_nn_rms` from its nearest train-split neighbour.

The classifier is trained by one deterministic command (`python tools/digits_classifier.py`) and
cached like the Inception weights, at `$JCDM_DIGITS_WEIGHTS` or ~/.cache/jcdm/digits_cnn.npz; a
missing cache is created on first use with the same function (seconds), logged, written
atomically.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcdm.data.sources import load_digits_images
from jcdm.fid.fid import FeatureStats, frechet_distance

log = logging.getLogger(__name__)

WEIGHTS_ENV = "JCDM_DIGITS_WEIGHTS"
IMAGE_SIZE = 16
FEATURE_DIM = 64
NUM_CLASSES = 10
HIT_FRACTION = 0.02  # a class is "hit" with >= 1/5 of its fair share of the samples
HELDOUT_EVERY = 6  # image i is held out iff i % 6 == 0: 300 held out, 1,497 train, stratified-ish

Params = dict[str, jax.Array]


def default_weights_path() -> Path:
    """$JCDM_DIGITS_WEIGHTS if set, else ~/.cache/jcdm/digits_cnn.npz."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/jcdm/digits_cnn.npz").expanduser()


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split: (train images, train labels, held-out images, held-out labels), images
    float32 in [-1, 1] as the trainer sees them."""
    images, labels = load_digits_images(IMAGE_SIZE)
    x = images.astype(np.float32) / 127.5 - 1.0
    held = np.arange(len(x)) % HELDOUT_EVERY == 0
    return x[~held], labels[~held], x[held], labels[held]


def init_params(key: jax.Array) -> Params:
    k = jax.random.split(key, 4)

    def he(k, shape, fan_in):
        return jax.random.normal(k, shape, jnp.float32) * np.sqrt(2.0 / fan_in)

    return {
        "conv1_w": he(k[0], (3, 3, 1, 16), 9),
        "conv1_b": jnp.zeros(16),
        "conv2_w": he(k[1], (3, 3, 16, 32), 9 * 16),
        "conv2_b": jnp.zeros(32),
        "fc1_w": he(k[2], (4 * 4 * 32, FEATURE_DIM), 512),
        "fc1_b": jnp.zeros(FEATURE_DIM),
        "fc2_w": he(k[3], (FEATURE_DIM, NUM_CLASSES), FEATURE_DIM) * 0.5,
        "fc2_b": jnp.zeros(NUM_CLASSES),
    }


def _conv_pool(x, w, b):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = jax.nn.relu(y + b)
    n, h, wd, c = y.shape
    return y.reshape(n, h // 2, 2, wd // 2, 2, c).mean(axis=(2, 4))


def features(params: Params, x: jax.Array) -> jax.Array:
    """Penultimate features [N, 64] of images [N, 16, 16, 1] in [-1, 1]."""
    h = _conv_pool(x, params["conv1_w"], params["conv1_b"])
    h = _conv_pool(h, params["conv2_w"], params["conv2_b"])
    return jax.nn.relu(h.reshape(h.shape[0], -1) @ params["fc1_w"] + params["fc1_b"])


def logits(params: Params, x: jax.Array) -> jax.Array:
    return features(params, x) @ params["fc2_w"] + params["fc2_b"]


def _shift(key: jax.Array, x: jax.Array) -> jax.Array:
    """Random translation by up to one pixel (zero = -1 background padding): generated digits
    are rarely centred exactly like the originals."""
    pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    dx, dy = jax.random.randint(key, (2,), 0, 3)
    return jax.lax.dynamic_slice(pad, (0, dy, dx, 0), x.shape)


def train_classifier(
    *, seed: int = 0, epochs: int = 30, batch_size: int = 64, learning_rate: float = 2e-3
) -> tuple[Params, float]:
    """Train on the fixed train split; returns (params, held-out accuracy). Deterministic: the
    batch order and augmentation come from `seed`, and XLA:CPU's reductions are fixed-order."""
    x_tr, y_tr, x_ho, y_ho = split()
    params = init_params(jax.random.PRNGKey(seed))
    tx = optax.adam(learning_rate)
    opt = tx.init(params)
    steps = len(x_tr) // batch_size

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

    @jax.jit
    def step(p, o, idx, key):
        x = _shift(key, jnp.asarray(x_tr)[idx])
        g = jax.grad(loss_fn)(p, x, jnp.asarray(y_tr)[idx])
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    # A Python loop over a jitted step, not lax.scan: XLA:CPU runs convolutions inside a loop
    # body several times slower (the trainer's `unroll_steps` exists for the same reason).
    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), epochs * steps)
    carry = (params, opt)
    for e in range(epochs):
        order = rng.permutation(len(x_tr))[: steps * batch_size].reshape(steps, batch_size)
        for i in range(steps):
            carry = step(*carry, order[i], keys[e * steps + i])
    params = carry[0]
    acc = float((np.asarray(jax.jit(logits)(params, x_ho)).argmax(-1) == y_ho).mean())
    return params, acc


def save_params(params: Params, path: str | os.PathLike, heldout_accuracy: float) -> None:
    """Write atomically (temp file + rename): concurrent first uses never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, heldout_accuracy=np.float64(heldout_accuracy), **jax.device_get(params))
    os.replace(tmp, path)


def load_params(path: str | os.PathLike | None = None) -> tuple[Params, float]:
    """(params, held-out accuracy) from the cache; a missing default cache is created (seconds)."""
    path = Path(path).expanduser() if path is not None else default_weights_path()
    if not path.is_file():
        log.info("digits classifier not cached at %s: training it once (deterministic)", path)
        params, acc = train_classifier()
        save_params(params, path, acc)
        log.info("digits classifier: held-out accuracy %.4f, cached at %s", acc, path)
    with np.load(path, allow_pickle=False) as z:
        expected = set(init_params(jax.random.PRNGKey(0))) | {"heldout_accuracy"}
        if set(z.files) != expected:
            raise ValueError(
                f"{path} is not a digits classifier (arrays {sorted(z.files)}); delete it and run "
                "python tools/digits_classifier.py"
            )
        acc = float(z["heldout_accuracy"])
        params = {k: jnp.asarray(z[k]) for k in z.files if k != "heldout_accuracy"}
    return params, acc


def _quantize(images: np.ndarray) -> np.ndarray:
    """Samples pass through uint8 like the real digits did (clip, round), as FID quantizes."""
    u8 = np.round(np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255))
    return u8.astype(np.float32) / 127.5 - 1.0


def _nn_rms(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """RMS pixel distance of each query to its nearest reference (both [N, 16, 16, 1])."""
    q = queries.reshape(len(queries), -1).astype(np.float64)
    r = refs.reshape(len(refs), -1).astype(np.float64)
    d2 = (q * q).sum(1)[:, None] - 2 * q @ r.T + (r * r).sum(1)[None, :]
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0) / q.shape[1])


class DigitsEvaluator:
    """Metrics of [N, 16, 16, 1] images in [-1, 1] against the digits (see the module doc)."""

    def __init__(self, weights: str | os.PathLike | None = None):
        self.params, self.heldout_accuracy = load_params(weights)
        self._feat = jax.jit(features)
        self._logits = jax.jit(logits)
        x_tr, _, x_ho, _ = split()
        self.train_images = x_tr
        self.heldout_images = x_ho
        self.all_images = np.concatenate([x_tr, x_ho])  # everything the generator trains on
        stats = FeatureStats()
        stats.update(self.features(x_tr))
        self.ref_mu, self.ref_sigma = stats.mean_cov()
        self.real_nn_rms = float(np.median(_nn_rms(x_ho, x_tr)))

    def features(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        return np.concatenate(
            [
                np.asarray(self._feat(self.params, jnp.asarray(images[i : i + batch_size])))
                for i in range(0, len(images), batch_size)
            ]
        )

    def __call__(self, images: np.ndarray) -> dict[str, float]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
            raise ValueError(
                f"the digits metric needs images [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 1] (the embedded "
                f"digits, make_train_iterator.image_size = {IMAGE_SIZE}); got {images.shape}. "
                "Use FIDConfig.features = 'inception' for other data."
            )
        if len(images) < 2:
            raise ValueError("the digits metric needs at least 2 images")
        x = _quantize(images)
        stats = FeatureStats()
        stats.update(self.features(x))
        mu, sigma = stats.mean_cov()
        pred = np.concatenate(
            [
                np.asarray(self._logits(self.params, jnp.asarray(x[i : i + 1000]))).argmax(-1)
                for i in range(0, len(x), 1000)
            ]
        )
        frac = np.bincount(pred, minlength=NUM_CLASSES) / len(pred)
        nz = frac[frac > 0]
        return {
            "fd": float(frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)),
            "classes": int((frac >= HIT_FRACTION).sum()),
            "evenness": float(0.0 - (nz * np.log(nz)).sum() / np.log(NUM_CLASSES)),  # no -0.0
            "nn_rms": float(np.median(_nn_rms(x, self.all_images))),
        }

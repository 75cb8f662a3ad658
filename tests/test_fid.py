"""FID math and plumbing that needs neither torch nor the real Inception weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from jcdm.fid import inception
from jcdm.fid.fid import (
    FeatureStats,
    frechet_distance,
    load_stats,
    load_stats_metadata,
    save_stats,
    trace_sqrt_product,
)


def _random_cov(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    return np.cov(x, rowvar=False)


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    )


@pytest.mark.parametrize("d", [8, 64])
def test_frechet_distance_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d, 4 * d), _random_cov(rng, d, 4 * d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = _scipy_fid(mu1, s1, mu2, s2)
    assert ref > 1.0
    assert abs(ours - ref) <= 1e-9 * ref, (ours, ref)
    # The distance is symmetric in its two Gaussians.
    assert abs(frechet_distance(mu2, s2, mu1, s1) - ours) <= 1e-9 * ref


def test_frechet_distance_closed_form_for_diagonal_covariances():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # = 5 + 1 + 1 + 6.25
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(13.25)


def test_trace_sqrt_is_stable_for_singular_covariances():
    # 10 samples in 256-d: rank 9, the situation of FID on few images. tr(sqrt(S S)) = tr(S).
    rng = np.random.default_rng(1)
    s = np.cov(rng.normal(size=(10, 256)), rowvar=False)
    assert trace_sqrt_product(s, s) == pytest.approx(np.trace(s), rel=1e-6)
    mu = rng.normal(size=256)
    fid_self = frechet_distance(mu, s, mu, s)
    assert abs(fid_self) < 1e-9 * np.trace(s), fid_self


def test_feature_stats_match_numpy_over_uneven_batches():
    rng = np.random.default_rng(2)
    # A large common offset: a raw sum-of-squares accumulator would lose digits here.
    x = rng.normal(size=(203, 16)) * 0.01 + 1e4
    stats = FeatureStats()
    for lo, hi in ((0, 1), (1, 50), (50, 51), (51, 203)):
        stats.update(x[lo:hi])
    mu, sigma = stats.mean_cov()
    assert stats.count == 203
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-14)

    a, b = FeatureStats(), FeatureStats()
    a.update(x[:70])
    b.update(x[70:])
    a.merge(b)
    np.testing.assert_allclose(a.mean_cov()[1], sigma, rtol=1e-8, atol=1e-14)


def test_feature_stats_rejects_bad_input():
    stats = FeatureStats()
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        stats.update(np.zeros(5))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="feature dim 3"):
        stats.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_cov()


def test_stats_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=6), _random_cov(rng, 6, 30)
    path = save_stats(tmp_path / "sub" / "ref.npz", mu, sigma, count=30, source="unit test")
    got_mu, got_sigma = load_stats(path)
    assert got_mu.dtype == np.float64 and np.array_equal(got_mu, mu)
    assert np.array_equal(got_sigma, sigma)
    assert load_stats_metadata(path) == {"count": 30, "source": "unit test"}
    assert frechet_distance(got_mu, got_sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(FileNotFoundError, match="tools/fid_stats.py"):
        load_stats(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="not"):
        save_stats(tmp_path / "bad.npz", mu, sigma[:3])


def test_preprocess_float_and_uint8_agree_and_resize_is_tf_legacy_bilinear():
    rng = np.random.default_rng(4)
    u8 = rng.integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)
    as_float = u8.astype(np.float32) / 127.5 - 1.0
    x_u8 = np.asarray(inception.preprocess(u8))
    x_f = np.asarray(inception.preprocess(as_float))
    assert x_u8.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(x_u8, x_f)
    # Output pixel j samples source coordinate j * in / out (no half-pixel shift, edge clamp).
    j = 150
    src = j * 4 / 299
    lo, frac = int(src), src - int(src)
    want = (1 - frac) * u8[0, lo, 0, 0].astype(np.float64) + frac * u8[0, lo + 1, 0, 0]
    assert x_u8[0, j, 0, 0] == pytest.approx((want - 128) / 128, abs=1e-5)
    assert x_u8[0, 0, 0, 0] == pytest.approx((u8[0, 0, 0, 0] - 128.0) / 128, abs=1e-6)
    assert x_u8[0, 298, 298, 2] == pytest.approx((u8[0, 3, 4, 2] - 128.0) / 128, abs=1e-6)
    assert x_u8.min() >= -1.0 and x_u8.max() <= 127 / 128


def test_preprocess_rejects_nchw_and_int32():
    with pytest.raises(ValueError, match="NCHW"):
        inception.preprocess(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        inception.preprocess(np.zeros((2, 32, 32, 3), np.int32))


def test_load_params_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "none.npz"))
    assert inception.default_weights_path() == tmp_path / "none.npz"
    with pytest.raises(FileNotFoundError, match="convert_inception_weights.py"):
        inception.load_params()
    np.savez(tmp_path / "wrong.npz", **{"conv.kernel": np.zeros((3, 3, 3, 32), np.float32)})
    with pytest.raises(ValueError, match="375 missing"):
        inception.load_params(tmp_path / "wrong.npz")

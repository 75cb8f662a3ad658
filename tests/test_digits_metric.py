"""The digits feature network and its metric (jcdm/fid/digits.py), in-process and fast: a
classifier trained for 2 epochs is enough to check what the metric must tell apart. The full
classifier, trained samples and the threshold are checked in tests/test_sample_quality.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jcdm.fid import digits
from jcdm.training import evaluation


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    params, acc = digits.train_classifier(epochs=2)
    path = tmp_path_factory.mktemp("digits") / "cnn.npz"
    digits.save_params(params, path, acc)
    return params, acc, digits.DigitsEvaluator(path)


def test_classifier_is_deterministic_and_learns(quick):
    params, acc, _ = quick
    again, acc2 = digits.train_classifier(epochs=2)
    assert acc == acc2 and acc > 0.85  # 2 epochs; the cached 30-epoch classifier reaches 0.99
    for k in params:
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(again[k]))


def test_split_is_fixed_and_disjoint():
    x_tr, y_tr, x_ho, y_ho = digits.split()
    assert (len(x_tr), len(x_ho)) == (1497, 300)
    assert set(np.unique(y_ho)) == set(range(10))
    assert x_tr.min() >= -1 and x_tr.max() <= 1
    flat_tr = {row.tobytes() for row in x_tr.reshape(len(x_tr), -1)}
    assert sum(row.tobytes() in flat_tr for row in x_ho.reshape(len(x_ho), -1)) == 0


def test_metric_orders_real_corrupted_noise(quick):
    ev = quick[2]
    rng = np.random.default_rng(0)
    real = ev(ev.heldout_images)
    corrupted = ev(np.clip(ev.heldout_images + rng.normal(0, 0.5, ev.heldout_images.shape), -1, 1))
    noise = ev(rng.normal(size=(300, 16, 16, 1)))
    assert real["fd"] < corrupted["fd"] < noise["fd"]
    assert real["classes"] == 10 and real["evenness"] > 0.99
    blank = ev(-np.ones((300, 16, 16, 1)))
    assert blank["classes"] == 1 and blank["evenness"] == 0.0


def test_nearest_neighbour_distance_flags_copies(quick):
    ev = quick[2]
    copies = ev(ev.train_images[:300])
    held = ev(ev.heldout_images)
    assert copies["nn_rms"] == pytest.approx(0.0, abs=1e-6)
    assert held["nn_rms"] == pytest.approx(0.0, abs=1e-6)  # the generator trains on all 1,797
    assert 0.1 < ev.real_nn_rms < 0.4  # a held-out digit to its nearest train-split digit


def test_wrong_images_name_the_fix(quick):
    with pytest.raises(ValueError, match="features = 'inception'"):
        quick[2](np.zeros((10, 32, 32, 3)))


def test_a_foreign_weights_file_is_refused(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, w=np.zeros(3))
    with pytest.raises(ValueError, match="tools/digits_classifier.py"):
        digits.load_params(bad)


def test_fid_config_features():
    assert evaluation.FIDConfig(every=10, features="digits").stats is None  # no stats needed
    with pytest.raises(ValueError, match="needs FIDConfig.stats"):
        evaluation.FIDConfig(every=10)
    with pytest.raises(ValueError, match="'inception' or 'digits'"):
        evaluation.FIDConfig(features="mnist")


def test_features_shape(quick):
    f = digits.features(quick[0], jax.numpy.zeros((3, 16, 16, 1)))
    assert f.shape == (3, digits.FEATURE_DIM)

"""The method's formulas against hand-computed values (docs/recipe.md section 1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcdm import ict


def test_karras_grid_endpoints_and_order():
    s = np.asarray(ict.karras_sigmas(11))
    assert s.shape == (11,)
    assert s[0] == np.float32(0.002) and s[-1] == np.float32(80.0)
    assert np.all(np.diff(s) > 0)
    # sigma_i by the formula in float64, i = 1..N.
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    ref = [(lo + (i - 1) / 10 * (hi - lo)) ** 7 for i in range(1, 12)]
    np.testing.assert_allclose(s, ref, rtol=2e-6)


def test_curriculum_doubles_every_50k_steps():
    assert ict.curriculum_period(400_000, 10, 1280) == 50_000
    got = [ict.num_scales(k, 400_000) for k in range(0, 400_000, 50_000)]
    assert got == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict.num_scales(49_999, 400_000) == 11
    assert ict.num_scales(399_999, 400_000) == 1281
    traced = jax.jit(lambda k: ict.num_scales(k, 400_000))
    assert [int(traced(k)) for k in (0, 50_000, 349_999, 350_000)] == [11, 21, 641, 1281]


def test_curriculum_is_exact_without_int32_overflow():
    # A run of 10**12 steps has K' > int32; a late step of a short run doubles past 2^31.
    steps = jnp.array([0, 1, 7, 8, 49_999, 50_000, 399_999, 10**6, 2**31 - 1], jnp.int32)
    for total_steps in (8, 400_000, 10**12):
        traced = jax.jit(jax.vmap(lambda k, n=total_steps: ict.num_scales(k, n)))(steps)
        exact = [ict.num_scales(int(k), total_steps) for k in steps]
        assert traced.tolist() == exact
        assert exact[-1] == (11 if total_steps == 10**12 else 1281)
    # The Python-int path stops doubling at s1 too: 2^(10^15 // K') would never finish.
    assert ict.num_scales(10**15, 8) == 1281


@pytest.mark.parametrize("n", [11, 81, 1281])
def test_index_probs_match_erf_formula(n):
    p = np.asarray(ict.index_probs(n), np.float64)
    assert p.shape == (n - 1,)
    assert abs(p.sum() - 1) < 1e-5
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    sig = [(lo + i / (n - 1) * (hi - lo)) ** 7 for i in range(n)]
    e = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sig]
    ref = np.diff(e)
    ref /= ref.sum()
    np.testing.assert_allclose(p, ref, rtol=2e-3, atol=1e-7)


def test_sampled_pairs_are_adjacent_and_follow_p():
    n = 11
    lo, hi = ict.sample_sigma_pairs(jax.random.PRNGKey(0), n, 20_000)
    grid = np.asarray(ict.karras_sigmas(n))
    idx = np.searchsorted(grid, np.asarray(lo) * (1 - 1e-6))
    np.testing.assert_allclose(np.asarray(lo), grid[idx], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hi), grid[idx + 1], rtol=1e-5)
    freq = np.bincount(idx, minlength=n - 1) / len(idx)
    np.testing.assert_allclose(freq, np.asarray(ict.index_probs(n)), atol=0.01)


def test_consistency_boundary_and_scalings():
    c_skip, c_out, c_in = ict.consistency_scalings(jnp.float32(0.002))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    assert float(c_in) == pytest.approx(1 / math.sqrt(0.002**2 + 0.25))
    c_skip, c_out, _ = ict.consistency_scalings(80.0)
    assert float(c_skip) == pytest.approx(0.25 / (79.998**2 + 0.25), rel=1e-5)
    assert float(c_out) == pytest.approx(0.5 * 79.998 / math.sqrt(0.25 + 6400), rel=1e-6)


def test_f_at_sigma_min_is_identity_for_any_network():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
    backbone = lambda p, x_in, c, k: (x_in * 1e3 + 7.0, None, None)  # arbitrary, finite
    f, _, _ = ict.consistency_fn(backbone, None, x, jnp.full((4,), 0.002), ict.ICTConfig())
    np.testing.assert_array_equal(np.asarray(f), np.asarray(x))


def test_pseudo_huber_per_sample():
    assert ict.default_huber_c(3072) == pytest.approx(0.0299298, abs=1e-6)
    a = jnp.zeros((2, 32, 32, 3))
    b = a.at[0].set(0.01).at[1].set(-0.5)
    c = 0.00054 * math.sqrt(3072)
    expect = [math.sqrt(3072 * 0.01**2 + c**2) - c, math.sqrt(3072 * 0.25 + c**2) - c]
    np.testing.assert_allclose(np.asarray(ict.pseudo_huber(a, b)), expect, rtol=1e-5)
    # The reference's per-pixel variant: mean over pixels of sqrt(d^2 + 0.003^2) - 0.003.
    pp = np.asarray(ict.pseudo_huber_per_pixel(a, b))
    np.testing.assert_allclose(pp[1], math.sqrt(0.25 + 0.003**2) - 0.003, rtol=1e-5)


def test_weights():
    assert float(ict.consistency_weight(jnp.float32(1.0), jnp.float32(1.5))) == pytest.approx(2.0)
    sigma = jnp.asarray([0.01, 1.0, 50.0])
    _, c_out, _ = ict.edm_scalings(sigma)
    # EDM's weight is 1 / c_out^2: the effective training target has unit variance.
    np.testing.assert_allclose(np.asarray(ict.edm_weight(sigma) * c_out**2), 1.0, rtol=1e-5)


def test_ema_update():
    ema = {"w": jnp.ones(3)}
    new = ict.ema_update(ema, {"w": jnp.zeros(3)}, 0.99993)
    np.testing.assert_allclose(np.asarray(new["w"]), 0.99993, rtol=1e-7)


def test_two_step_sampler_noise_level():
    key = jax.random.PRNGKey(0)
    f = lambda x, s: jnp.zeros_like(x)  # returns the data mean, 0
    seen = []

    def spy(x, s):
        seen.append(float(s[0]))
        return f(x, s) if len(seen) == 1 else x

    x = ict.consistency_sample(spy, key, (4096, 2), intermediate_sigmas=(ict.TWO_STEP_SIGMA,))
    assert seen == pytest.approx([80.0, 0.821])
    assert float(jnp.std(x)) == pytest.approx(math.sqrt(0.821**2 - 0.002**2), rel=0.03)


def test_edm_heun_sampler_recovers_gaussian_data():
    s_data = 0.5
    denoise = lambda x, s: (s_data**2 / (s_data**2 + s[:, None] ** 2)) * x  # exact for N(0, sd^2)
    # Heun's truncation error on this linear ODE is ~5% at 18 steps and shrinks as 1/n^2.
    key = jax.random.PRNGKey(0)
    z_std = float(jnp.std(jax.random.normal(key, (8192, 1))))  # the sampler's own start noise
    exact = z_std * 80.0 * s_data / math.sqrt(80.0**2 + s_data**2)  # the ODE's exact solution
    errs = []
    for n in (18, 72):
        x = ict.edm_heun_sample(denoise, key, (8192, 1), num_steps=n)
        errs.append(abs(float(jnp.std(x)) / exact - 1))
    assert errs[1] < 0.02 and errs[1] < errs[0] / 4

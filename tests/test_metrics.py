"""Tests of psld_fast.metrics: sliced Wasserstein (+ bootstrap interval), Gaussian W2, moments."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from psld_fast.metrics import (_Replicator, bures_w2, gaussian_w2, gaussian_w2_diag, moment_errors,
                               projections, sliced_wasserstein, sliced_wasserstein_ci)


def _normals(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


# ---------------------------------------------------------------------------------------------
# sliced Wasserstein

def test_projections_unit_and_deterministic():
    t = projections(5, 64, seed=3)
    assert t.shape == (64, 5) and t.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(t, projections(5, 64, seed=3))
    assert not np.allclose(t, projections(5, 64, seed=4))


@pytest.mark.parametrize("p", [1, 2, 3])
def test_sw_self_is_zero(p):
    a = _normals(300, 6, 0)
    assert sliced_wasserstein(a, a, p=p) == 0.0
    # same empirical law, different sizes (N != M path): still exactly 0 up to rounding
    assert sliced_wasserstein(a, torch.cat([a, a]), p=p) < 1e-12


@pytest.mark.parametrize("p", [1, 2])
def test_sw_symmetric_and_flattens(p):
    a = _normals(200, 12, 1).reshape(200, 3, 2, 2)
    b = _normals(130, 12, 2, shift=0.3).reshape(130, 3, 2, 2)
    ab = sliced_wasserstein(a, b, p=p)
    assert ab > 0
    assert ab == pytest.approx(sliced_wasserstein(b, a, p=p), rel=1e-12, abs=0)
    assert ab == sliced_wasserstein(a.reshape(200, -1).numpy(), b.reshape(130, -1).numpy(), p=p)


def test_sw_one_dim_matches_scipy_exact_unequal_sizes():
    # In 1-D every unit projection is +-1, so SW_1 is W_1 of the two empirical laws.
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal(137), rng.gamma(2.0, size=89)
    ref = scipy.stats.wasserstein_distance(a, b)
    assert sliced_wasserstein(a[:, None], b[:, None], p=1, n_projections=4) == pytest.approx(ref, rel=1e-12)


def test_sw_two_dim_known_w2_via_quantiles():
    # W_2 between empirical laws of sizes 2 and 3 on a line, by hand: quantile functions
    # a: 0 on (0,1/2], 1 on (1/2,1];  b: 0,0.5,2 on thirds.  W2^2 = 1/3*0 + 1/6*.25 + 1/6*.25 + 1/3*1
    a = np.array([[0.0], [1.0]])
    b = np.array([[0.0], [0.5], [2.0]])
    expected = math.sqrt(1 / 6 * 0.25 + 1 / 6 * 0.25 + 1 / 3 * 1.0)
    assert sliced_wasserstein(a, b, n_projections=3) == pytest.approx(expected, rel=1e-13)


def test_sw_gaussian_shift_exact_shift():
    # b = a + mu: on every projection the laws differ by a shift, so W_2 = |<theta, mu>| exactly and
    # SW_2^2 = mean_l <theta_l, mu>^2 -> E<theta, mu>^2 = |mu|^2 / d.  Only projection Monte Carlo
    # error remains (5000 projections: ~1%; seeds 0..5 stay within 1.2%); bound 3%.
    d = 8
    mu = torch.linspace(-1, 1, d, dtype=torch.float64) * 0.8
    a = _normals(300, d, 0)
    theta = projections(d, 5000, seed=0)
    sw = sliced_wasserstein(a, a + mu, n_projections=5000, seed=0)
    assert sw == pytest.approx(math.sqrt(np.mean((theta @ mu.numpy()) ** 2)), rel=1e-10)
    assert sw == pytest.approx(float(mu.norm()) / math.sqrt(d), rel=0.03)


def test_sw_gaussian_shift_independent_samples():
    # N(0, I) vs N(mu, I) in d = 8 from independent samples, N = 3000, 1000 projections:
    # SW_2 -> |mu| / sqrt(d).  Sample-mean error (~2% on SW), projection error (~2%) and the
    # finite-sample floor: seeds 0..5 stay within 5.1%; bound 10%.
    d = 8
    mu = torch.linspace(-1, 1, d, dtype=torch.float64) * 0.8
    a, b = _normals(3000, d, 0), _normals(3000, d, 1, shift=mu)
    sw = sliced_wasserstein(a, b, n_projections=1000, seed=0)
    assert sw == pytest.approx(float(mu.norm()) / math.sqrt(d), rel=0.10)


def test_sw_rejects_bad_input():
    with pytest.raises(ValueError):
        sliced_wasserstein(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError):
        sliced_wasserstein(np.zeros((3, 2)), np.zeros((3, 2)), p=0.5)


# ---------------------------------------------------------------------------------------------
# bootstrap interval

@pytest.mark.parametrize("p,m", [(2, 150), (2, 97), (1, 97), (3, 150)])
def test_replicator_equals_explicit_resample(p, m):
    n, d = 150, 5
    x, y = _normals(n, d, 3).numpy(), _normals(m, d, 4, shift=0.2).numpy()
    theta = projections(d, 32, seed=0)
    proj = theta @ x.T
    order = np.argsort(proj, axis=1)
    rep = _Replicator(np.take_along_axis(proj, order, axis=1), order, np.sort(theta @ y.T, axis=1), p)
    rng = np.random.default_rng(0)
    for _ in range(3):
        c = np.bincount(rng.integers(0, n, size=n), minlength=n)
        direct = sliced_wasserstein(x[np.repeat(np.arange(n), c)], y, n_projections=32, p=p) ** p
        assert rep(c) == pytest.approx(direct, rel=1e-10, abs=1e-14)


def test_ci_contains_value_and_shrinks_with_n():
    d = 16
    ref = _normals(2000, d, 10)
    widths = []
    for n in (200, 1600):
        r = sliced_wasserstein_ci(_normals(n, d, 11, shift=0.25), ref, n_projections=128, seed=0)
        assert set(r) >= {"value", "lo", "hi", "n"} and r["n"] == n
        assert r["value"] == pytest.approx(
            sliced_wasserstein(_normals(n, d, 11, shift=0.25), ref, n_projections=128, seed=0), rel=1e-12)
        assert 0 <= r["lo"] < r["value"] < r["hi"]
        widths.append(r["hi"] - r["lo"])
    # width ~ 1/sqrt(N): 8x the samples -> ~0.35x the width
    assert widths[1] < 0.6 * widths[0]


def test_ci_percentile_deterministic_and_callable_reference():
    d = 4
    x = _normals(300, d, 0, shift=0.5)
    ref_arr = _normals(400, d, 1)

    def sampler(n):
        return _normals(n, d, 1)

    r1 = sliced_wasserstein_ci(x, ref_arr, n_boot=50, method="percentile", seed=2)
    r2 = sliced_wasserstein_ci(x, sampler, n_boot=50, method="percentile", seed=2, n_reference=400)
    assert r1 == r2
    assert r1["lo"] < r1["hi"] and r1["method"] == "percentile" and r1["n_boot"] == 50
    # well away from the finite-sample floor the percentile interval covers the value too
    assert r1["lo"] <= r1["value"] <= r1["hi"]
    r3 = sliced_wasserstein_ci(x, ref_arr, n_boot=50, seed=2)
    assert r3["value"] == r1["value"] and r3["method"] == "normal"
    assert r3["lo"] == pytest.approx(r3["value"] - NormalDist().inv_cdf(0.975) * r3["std"], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Gaussian W2 and moments

def _diag_design(means, stds):
    """Samples whose sample mean is exactly ``means`` and sample covariance exactly diag(stds^2)."""
    d = len(means)
    h = scipy.linalg.hadamard(16)[:, 1:d + 1].astype(np.float64)   # orthogonal +-1 columns, mean 0
    h *= math.sqrt(15 / 16)                                         # ddof=1 variance 1
    return h * np.asarray(stds) + np.asarray(means)


def test_gaussian_w2_diag_closed_form():
    m1, s1 = np.array([0.1, -0.3, 2.0, 0.0]), np.array([1.0, 0.5, 2.0, 1.5])
    m2, s2 = np.array([0.0, 0.2, 1.0, 0.5]), np.array([0.7, 0.5, 3.0, 1.0])
    x = _diag_design(m1, s1)
    np.testing.assert_allclose(x.mean(0), m1, atol=1e-14)
    np.testing.assert_allclose(np.cov(x, rowvar=False), np.diag(s1 ** 2), atol=1e-13)
    closed = math.sqrt(np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2))
    assert gaussian_w2(x, m2, np.diag(s2 ** 2)) == pytest.approx(closed, rel=1e-10)
    assert gaussian_w2(torch.from_numpy(x), torch.from_numpy(m2), s2 ** 2) == pytest.approx(closed, rel=1e-10)
    assert gaussian_w2_diag(x, m2, s2 ** 2) == pytest.approx(closed, rel=1e-12)
    assert gaussian_w2(x, m1, np.diag(s1 ** 2)) == pytest.approx(0.0, abs=1e-6)


def test_bures_w2_general_matches_sqrtm_formula():
    rng = np.random.default_rng(0)
    d = 6
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    r1 = scipy.linalg.sqrtm(s1)
    cross = np.real(scipy.linalg.sqrtm(r1 @ s2 @ r1))
    ref = math.sqrt(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * cross))
    assert bures_w2(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)
    assert bures_w2(m2, s2, m1, s1) == pytest.approx(ref, rel=1e-8)
    # gaussian_w2 uses the ddof=1 sample moments
    x = rng.standard_normal((50, d)) @ a.T
    assert gaussian_w2(x, m2, s2) == pytest.approx(bures_w2(x.mean(0), np.cov(x, rowvar=False), m2, s2), rel=1e-12)


def test_gaussian_w2_sampling_consistency():
    x = _normals(20000, 3, 0).numpy() * np.array([1.0, 2.0, 0.5]) + 1.0
    assert gaussian_w2(x, 1.0, np.diag([1.0, 4.0, 0.25])) < 0.05
    assert gaussian_w2_diag(x, 1.0, [1.0, 4.0, 0.25]) < 0.05


def test_moment_errors():
    x = _diag_design([0.5, -1.0, 0.0], [1.0, 2.0, 3.0])
    e = moment_errors(x, [0.5, -1.0, 0.25], [1.0, 4.0, 8.0])
    assert e["mean"] == pytest.approx(0.25, abs=1e-12)
    assert e["var"] == pytest.approx(1.0, abs=1e-12)
    e0 = moment_errors(torch.from_numpy(x).reshape(16, 3, 1, 1), [0.5, -1.0, 0.0], [1.0, 4.0, 9.0])
    assert e0["mean"] < 1e-12 and e0["var"] < 1e-12


def test_marginal_wasserstein_is_the_per_coordinate_w2():
    """Exact on empirical laws: a shifted and scaled copy has per-coordinate W2^2 = shift^2 + (scale-1)^2 E x^2
    for one coordinate's sorted pairs; zero for a permuted copy; symmetric; sums coordinates; N != M works."""
    from psld_fast.metrics import marginal_wasserstein

    g = np.random.default_rng(0)
    a = g.standard_normal((500, 3))
    perm = a[g.permutation(500)]
    assert marginal_wasserstein(a, perm) == pytest.approx(0.0, abs=1e-12)
    b = a.copy()
    b[:, 1] = 2.0 * a[:, 1] + 0.5  # monotone map of one coordinate: the sorted pairs are matched
    want = np.sqrt(np.mean((b[:, 1] - a[:, 1]) ** 2))
    assert marginal_wasserstein(a, b) == pytest.approx(want, rel=1e-12)
    assert marginal_wasserstein(b, a) == pytest.approx(want, rel=1e-12)
    c = g.standard_normal((300, 3)) * np.array([1.0, 0.1, 1.0])
    assert marginal_wasserstein(a, c) > marginal_wasserstein(a, g.standard_normal((300, 3)))

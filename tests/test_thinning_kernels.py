"""Kernel values, power kernels and lookup, checked against direct formulas."""

import math

import numpy as np
import pytest
from scipy import special

from distillkit.thinning import (
    IMQ,
    BSpline,
    Gaussian,
    Laplace,
    Matern,
    Sinc,
    get_kernel,
    median_bandwidth,
)


@pytest.fixture
def pts():
    rng = np.random.default_rng(0)
    return rng.standard_normal((7, 3)), rng.standard_normal((5, 3))


def _dist(X, Y):
    return np.sqrt(((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1))


def test_gaussian_laplace_imq_values(pts):
    X, Y = pts
    r = _dist(X, Y)
    np.testing.assert_allclose(Gaussian(1.3)(X, Y), np.exp(-(r**2) / (2 * 1.3**2)), rtol=1e-10)
    np.testing.assert_allclose(Laplace(0.7)(X, Y), np.exp(-r / 0.7), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(IMQ(0.8, 1.1)(X, Y), (1 + r**2 / 1.1**2) ** -0.8, rtol=1e-10)


@pytest.mark.parametrize("nu", [2.0, 2.5, 3.7])
def test_matern_values(pts, nu):
    X, Y = pts
    d, sig = X.shape[1], 0.9
    a = nu - d / 2
    z = _dist(X, Y) / sig
    want = 2 ** (1 - a) / special.gamma(a) * z**a * special.kv(a, z)
    np.testing.assert_allclose(Matern(nu, sig)(X, Y), want, rtol=1e-7)


def test_matern_with_nu_half_dplus1_is_laplace(pts):
    X, Y = pts
    np.testing.assert_allclose(Matern(2.0, 0.6)(X, Y), Laplace(0.6)(X, Y), rtol=1e-7, atol=1e-12)


def test_matern_needs_nu_above_half_d(pts):
    X, Y = pts
    with pytest.raises(ValueError, match="nu > d/2"):
        Matern(1.5, 1.0)(X, Y)


def test_sinc_values(pts):
    X, Y = pts
    th = 1.7
    t = th * (X[:, None, :] - Y[None, :, :])
    want = np.prod(np.sin(t) / t, axis=-1)
    np.testing.assert_allclose(Sinc(th)(X, Y), want, rtol=1e-10)


def _cubic_bspline(t):
    t = np.abs(t)
    return np.where(t <= 1, 2 / 3 - t**2 + t**3 / 2, np.where(t <= 2, (2 - t) ** 3 / 6, 0.0))


def test_bspline_values(pts):
    X, Y = pts
    sig = 1.4
    diff = (X[:, None, :] - Y[None, :, :]) / sig
    np.testing.assert_allclose(
        BSpline(1, sig)(X, Y), np.prod(_cubic_bspline(diff) / (2 / 3), axis=-1), atol=1e-12
    )
    tri = np.prod(np.maximum(0.0, 1 - np.abs(diff)), axis=-1)
    np.testing.assert_allclose(BSpline(0, sig)(X, Y), tri, atol=1e-12)


@pytest.mark.parametrize(
    "k", [Gaussian(1.0), Laplace(1.0), Matern(2.5, 1.0), IMQ(0.5, 1.0), Sinc(1.0), BSpline(1, 1.0)]
)
def test_diag_supnorm_and_batch(pts, k):
    X, Y = pts
    np.testing.assert_allclose(np.diag(k(X, X)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(k.diag(X), 1.0)
    assert k.sup_norm == 1.0
    batch = k(np.stack([X, X]), np.stack([Y, Y]))
    assert batch.shape == (2, 7, 5)
    np.testing.assert_allclose(batch[1], k(X, Y), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(k.paired(X[:5], Y), np.diag(k(X[:5], Y)), rtol=1e-6, atol=1e-12)


def test_power_kernels_parameters():
    g = Gaussian(2.0).power(0.5)
    assert isinstance(g, Gaussian) and math.isclose(g.sigma**2, 2.0**2 * 0.5)
    lp = Laplace(1.5).power(0.8, d=3)
    assert isinstance(lp, Matern) and math.isclose(lp.nu, 0.8 * 4 / 2) and lp.sigma == 1.5
    mp = Matern(3.0, 1.0).power(0.6, d=2)
    assert isinstance(mp, Matern) and math.isclose(mp.nu, 1.8)
    ip = IMQ(2.0, 1.0).sqrt(d=2)
    assert isinstance(ip, Matern) and math.isclose(ip.nu, 2 / 4 + 2.0 / 2)
    assert Sinc(2.0).power(0.5) == Sinc(2.0)
    assert BSpline(3, 1.0).sqrt() == BSpline(1, 1.0)  # odd beta: alpha = 1/2
    assert BSpline(2, 1.0).power(4 / 6) == BSpline(1, 1.0)  # even beta: (beta+2)/(2beta+2)


@pytest.mark.parametrize(
    "kernel,alpha,d",
    [
        (Laplace(1.0), 0.5, 2),  # needs alpha > d/(d+1) = 2/3
        (Matern(2.0, 1.0), 0.4, 2),  # needs alpha > d/(2 nu) = 1/2
        (IMQ(0.5, 1.0), 0.7, 2),
        (BSpline(3, 1.0), 0.7, 1),
        (BSpline(2, 1.0), 0.5, 1),
        (Gaussian(1.0), 1.5, 1),
    ],
)
def test_invalid_alpha_lists_valid(kernel, alpha, d):
    with pytest.raises(ValueError, match="valid alphas"):
        kernel.power(alpha, d)


def _conv_on_grid(f, grid):
    """(f * f)(x) on the grid for a symmetric 1-D function f."""
    h = grid[1] - grid[0]
    return np.array([np.sum(f(x - grid) * f(grid)) * h for x in grid])


@pytest.mark.parametrize("kernel", [Gaussian(0.8), BSpline(1, 0.8), BSpline(3, 0.5)])
def test_root_kernel_convolves_to_kernel(kernel):
    # k_rt * k_rt must be proportional to k (Fourier transform squared)
    root = kernel.sqrt(d=1)
    grid = np.linspace(-8, 8, 801)

    def f(t):
        return root(np.asarray(t)[:, None], np.zeros((1, 1)))[:, 0]

    conv = _conv_on_grid(f, grid)
    want = kernel(grid[:, None], np.zeros((1, 1)))[:, 0]
    ratio = conv[400] / want[400]
    np.testing.assert_allclose(conv, ratio * want, atol=2e-3 * ratio)


def test_median_bandwidth_and_fit():
    X = np.random.default_rng(3).standard_normal((60, 2))
    r = _dist(X, X)[np.triu_indices(60, 1)]
    med = float(np.median(r))
    assert math.isclose(median_bandwidth(X), med, rel_tol=1e-9)
    assert math.isclose(Gaussian("median").fit(X).sigma, med, rel_tol=1e-9)
    assert math.isclose(Sinc("median").fit(X).theta, 1 / med, rel_tol=1e-9)
    with pytest.raises(ValueError, match="fit"):
        Gaussian("median")(X, X)


def test_get_kernel():
    k = get_kernel("Gaussian", bandwidth=2.0)
    assert isinstance(k, Gaussian) and k.sigma == 2.0
    assert get_kernel("matern", nu=2.5, sigma=1.0) == Matern(2.5, 1.0)
    assert get_kernel("sinc", bandwidth=3.0).theta == 3.0
    with pytest.raises(ValueError, match="gaussian"):
        get_kernel("rbf")
    with pytest.raises(ValueError, match="sigma"):
        Gaussian(-1.0)

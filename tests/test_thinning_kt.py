"""KT-SPLIT / KT-SWAP / kt, baselines and MMD, checked against direct computations."""

import numpy as np
import pytest

from distillkit.thinning import (
    Gaussian,
    Laplace,
    Matern,
    iid,
    kt,
    kt_split,
    kt_swap,
    mmd,
    mmd_to_gaussian,
    standard_thin,
)


def _data(n, d=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


def _brute_mmd(X, Y, sigma, wy=None):
    def k(A, B):
        return np.exp(-((A[:, None, :] - B[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))

    wx = np.full(len(X), 1 / len(X))
    wy = np.full(len(Y), 1 / len(Y)) if wy is None else wy / wy.sum()
    val = wx @ k(X, X) @ wx - 2 * wx @ k(X, Y) @ wy + wy @ k(Y, Y) @ wy
    return np.sqrt(max(val, 0.0))


def test_mmd_matches_double_sum():
    X = _data(300, 3)
    idx = np.array([1, 5, 9, 200, 299])
    k = Gaussian(1.2)
    assert mmd(X, k, indices=idx) == pytest.approx(_brute_mmd(X, X[idx], 1.2), rel=1e-8)
    Y = _data(40, 3, seed=1)
    w = np.random.default_rng(2).random(40)
    assert mmd(X, k, Y=Y, weights=w) == pytest.approx(_brute_mmd(X, Y, 1.2, w), rel=1e-8)


def test_mmd_is_blockwise(monkeypatch):
    import importlib

    mmd_mod = importlib.import_module("distillkit.thinning.mmd")
    monkeypatch.setattr(mmd_mod, "_BLOCK_ELEMS", 64)  # forces many row blocks
    X = _data(150)
    idx = np.arange(0, 150, 7)
    assert mmd(X, Gaussian(1.0), indices=idx) == pytest.approx(_brute_mmd(X, X[idx], 1.0), rel=1e-8)


def test_mmd_to_gaussian_closed_form_against_quadrature():
    # d = 1: integrate against the N(0, 1) density on a fine grid
    X = np.array([[0.3], [-1.2], [2.0]])
    s = 0.9
    z = np.linspace(-12, 12, 12001)
    h = z[1] - z[0]
    p = np.exp(-(z**2) / 2) / np.sqrt(2 * np.pi)
    kxz = np.exp(-((X - z[None, :]) ** 2) / (2 * s**2))
    ez = (kxz * p).sum(1) * h
    kzz = np.exp(-((z[:, None] - z[None, ::20]) ** 2) / (2 * s**2))
    ezz = p @ kzz @ p[::20] * h * h * 20
    kxx = np.exp(-((X - X.T) ** 2) / (2 * s**2))
    want = np.sqrt(kxx.mean() - 2 * ez.mean() + ezz)
    assert mmd_to_gaussian(X, s) == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("n,m", [(256, 3), (300, 3)])
def test_split_is_partition(n, m):
    X = _data(n)
    c = kt_split(X, Gaussian(2.0), m, seed=1)
    assert c.shape == (2**m, n // 2**m) and c.dtype == np.int64
    flat = c.ravel()
    assert np.unique(flat).size == flat.size  # disjoint
    # every point but the n mod 2^m leftovers is in exactly one candidate
    assert flat.size == n - n % 2**m and flat.min() >= 0 and flat.max() < n


def test_seed_determinism():
    X = _data(512)
    k = Gaussian(2.0)
    a = kt(X, k, seed=3)
    np.testing.assert_array_equal(a, kt(X, k, seed=3))
    np.testing.assert_array_equal(kt_split(X, k, 3, seed=5), kt_split(X, k, 3, seed=5))
    assert not np.array_equal(kt_split(X, k, 3, seed=5), kt_split(X, k, 3, seed=6))
    np.testing.assert_array_equal(iid(X, 20, seed=1), iid(X, 20, seed=1))


def test_kt_beats_iid_and_standard_thinning():
    n, d = 2**10, 2
    k = Gaussian(np.sqrt(2 * d))
    res = {"kt": [], "iid": [], "std": []}
    for s in range(10):
        X = _data(n, d, seed=100 + s)
        res["kt"].append(mmd(X, k, indices=kt(X, k, m=5, seed=s)))
        res["iid"].append(mmd(X, k, indices=iid(X, 32, seed=s)))
        res["std"].append(mmd(X, k, indices=standard_thin(X, m=5)))
    assert np.mean(res["kt"]) < np.mean(res["iid"])
    assert np.mean(res["kt"]) < np.mean(res["std"])


@pytest.mark.parametrize("n,size", [(1000, 31), (777, 1), (600, 300), (513, 40)])
def test_any_n_exact_size(n, size):
    X = _data(n)
    idx = kt(X, Gaussian(2.0), coreset_size=size, seed=0)
    assert idx.shape == (size,) and idx.dtype == np.int64
    assert np.all(np.diff(idx) >= 0) and idx.min() >= 0 and idx.max() < n


def test_leftover_points_are_in_the_target():
    # 2^m * floor(n / 2^m) = 512 of n = 575 points enter the split; the 63 leftovers include
    # a far cluster that KT-SWAP must still cover, since its MMD target is all n points.
    rng = np.random.default_rng(0)
    X = np.vstack([rng.standard_normal((512, 2)), rng.standard_normal((63, 2)) * 0.1 + 8])
    idx = kt(X, Gaussian(2.0), m=4, seed=0)
    assert np.sum(idx >= 512) >= 1


@pytest.mark.parametrize("kernel", [Laplace(1.5), Matern(2.0, 1.5)])
def test_kt_plus_and_power_without_root_kernel(kernel):
    X = _data(256)
    with pytest.raises(ValueError, match="valid alphas"):
        kt(X, kernel, split="root")
    out = {"plus": [], "power": [], "iid": []}
    for s in range(3):
        out["plus"].append(mmd(X, kernel, indices=kt(X, kernel, split="plus", seed=s)))
        out["power"].append(mmd(X, kernel, indices=kt(X, kernel, split="power", seed=s)))
        out["iid"].append(mmd(X, kernel, indices=iid(X, 16, seed=s)))
    assert np.mean(out["plus"]) < np.mean(out["iid"])
    assert np.mean(out["power"]) < np.mean(out["iid"])


def test_root_kt_gaussian_and_median_bandwidth():
    # "gaussian" must resolve to the median pairwise distance (computed here directly), and
    # root KT must beat an equal-size uniform subsample in MMD for that kernel
    n = 512
    rel = []
    for s in range(3):
        X = _data(n, seed=30 + s)
        med = float(
            np.median(np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))[np.triu_indices(n, 1)])
        )
        idx = kt(X, "gaussian", split="root", seed=s)
        np.testing.assert_array_equal(idx, kt(X, Gaussian(med), split="root", seed=s))
        assert idx.size == round(np.sqrt(n))
        rnd = np.random.default_rng(s).choice(n, idx.size, replace=False)
        rel.append(_brute_mmd(X, X[idx], med) / _brute_mmd(X, X[rnd], med))
    assert np.mean(rel) < 0.5


def test_swap_does_not_increase_mmd_and_unique():
    X = _data(512)
    k = Gaussian(2.0)
    cands = kt_split(X, k, 4, seed=0)
    best = min(mmd(X, k, indices=c) for c in cands)
    out = kt_swap(X, cands, k)
    assert mmd(X, k, indices=out) <= best * (1 + 1e-6)
    out2 = kt_swap(X, cands, k, passes=3, unique=True)
    assert np.unique(out2).size == out2.size == cands.shape[1]
    assert mmd(X, k, indices=out2) <= best * (1 + 1e-6)


def test_standard_thin_counts_back_from_end():
    X = _data(100)
    np.testing.assert_array_equal(standard_thin(X, m=3), np.arange(99, -1, -8)[:12][::-1])


@pytest.mark.parametrize(
    "X,kwargs,match",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), {}, "NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), {}, "NaN or inf"),
        (np.zeros(10), {}, "2-D"),
        (np.zeros((0, 2)), {}, "non-empty"),
        (np.zeros((10, 2)), {"coreset_size": 11}, "coreset_size"),
        (np.zeros((10, 2)), {"coreset_size": 0}, "coreset_size"),
        (np.zeros((10, 2)), {"split": "magic"}, "split"),
        (np.zeros((10, 2)), {"kernel": "rbf"}, "kernel"),
        (np.zeros((10, 2)), {"m": 5}, "m="),
        (np.zeros((10, 2)), {"delta": 2.0}, "delta"),
    ],
)
def test_bad_input(X, kwargs, match):
    kwargs = {"kernel": Gaussian(1.0), **kwargs}
    with pytest.raises(ValueError, match=match):
        kt(X, **kwargs)


def test_bad_mmd_input():
    X = _data(20)
    with pytest.raises(ValueError, match="indices"):
        mmd(X, Gaussian(1.0), indices=np.array([0, 25]))
    with pytest.raises(ValueError, match="Y"):
        mmd(X, Gaussian(1.0), Y=np.zeros((3, 5)))

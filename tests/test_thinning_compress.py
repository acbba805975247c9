"""Compress / Compress++ for any n: sizes, eligibility of every point, quality, errors."""

import importlib

import numpy as np
import pytest

from distillkit.thinning import Gaussian, compress, compresspp, iid, mmd
from distillkit.thinning.kt import _prepare

# the package re-exports the function compress under the module's name
compress_mod = importlib.import_module("distillkit.thinning.compress")
_halve_groups = compress_mod._halve_groups


def _data(n, d=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


@pytest.mark.parametrize("n", [1024, 1000, 777])
def test_compress_output_size_and_indices(n):
    X = _data(n)
    g = 1
    out = compress(X, Gaussian(2.0), g=g, seed=0)
    assert out.dtype == np.int64 and np.unique(out).size == out.size
    assert out.min() >= 0 and out.max() < n
    # the output has between 2^(g-1) sqrt(n) and 2^g sqrt(n) points (+ rounding)
    assert 2 ** (g - 1) * np.sqrt(n) - 4 <= out.size <= 2**g * np.sqrt(n) + 4


def test_compress_keeps_every_point_eligible():
    # n = 4^4 + 200: goodpoints would drop the 200 tail points before compressing
    n = 456
    X = _data(n)
    seen = set()
    for s in range(4):
        seen.update(compress(X, Gaussian(2.0), g=1, seed=s).tolist())
    assert max(seen) >= 256 and sum(i >= 256 for i in seen) > 20


def test_compresspp_covers_a_cluster_at_the_end():
    # a quarter of the mass sits in a far cluster in the last rows; truncating to the
    # largest power of 4 (256) would exclude it completely
    rng = np.random.default_rng(1)
    X = np.vstack([rng.standard_normal((300, 2)), rng.standard_normal((100, 2)) * 0.3 + 10])
    idx = compresspp(X, Gaussian(2.0), g=1, coreset_size=20, seed=0)
    assert idx.size == 20
    frac = np.mean(idx >= 300)
    assert 0.1 <= frac <= 0.4


@pytest.mark.parametrize("n,size", [(4096, None), (3000, 50), (2000, 7)])
def test_compresspp_sizes(n, size):
    X = _data(n)
    idx = compresspp(X, Gaussian(2.0), g=2, coreset_size=size, seed=0)
    want = size if size is not None else round(np.sqrt(n))
    assert idx.size == want and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < n


def test_compresspp_determinism_and_quality():
    k = Gaussian(2.0)
    X = _data(2048, seed=4)
    np.testing.assert_array_equal(compresspp(X, k, g=2, seed=1), compresspp(X, k, g=2, seed=1))
    cpp, rnd = [], []
    for s in range(3):
        X = _data(2048, seed=10 + s)
        cpp.append(mmd(X, k, indices=compresspp(X, k, g=2, seed=s)))
        rnd.append(mmd(X, k, indices=iid(X, 45, seed=s)))
    assert np.mean(cpp) < 0.5 * np.mean(rnd)


def _brute_mmd(X, idx, sigma):
    """MMD between X and X[idx] from the full Gaussian kernel matrix (no package code)."""
    K = np.exp(-((X[:, None, :] - X[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))
    w = np.full(len(X), -1.0 / len(X))
    np.add.at(w, idx, 1.0 / len(idx))
    return np.sqrt(max(w @ K @ w, 0.0))


def test_compresspp_without_swap_beats_iid():
    # KT-SPLIT-only halving (no KT-SWAP) must still beat an equal-size uniform subsample
    n, sigma = 1024, 2.0
    cpp, rnd = [], []
    for s in range(4):
        X = _data(n, seed=20 + s)
        half = compress(X, Gaussian(sigma), g=2, seed=s, swap=False)
        assert np.unique(half).size == half.size == 4 * 32  # 2^g sqrt(n), distinct
        idx = compresspp(X, Gaussian(sigma), g=2, seed=s, swap=False, unique=True)
        assert idx.size == 32 and np.unique(idx).size == idx.size
        cpp.append(_brute_mmd(X, idx, sigma))
        rnd.append(_brute_mmd(X, np.random.default_rng(s).choice(n, 32, replace=False), sigma))
    assert np.mean(cpp) < 0.6 * np.mean(rnd)


def _z_score(err):
    return err.mean() / (err.std(ddof=1) / np.sqrt(err.size))


@pytest.mark.parametrize("swap", [True, False])
def test_halving_is_unbiased(swap):
    # Symmetrised halving returns a half or its complement with probability 1/2 each, so
    # E[mean of f over the half] = mean of f over the input for every f. One fixed input of
    # L = 16 points is halved by G independent groups in a single batched call.
    L, G = 16, 3000
    X = _data(L, seed=1)
    _, kern, X32 = _prepare(X, Gaussian(1.0))
    groups = np.tile(np.arange(L), (G, 1))
    keep = _halve_groups(kern, X32, groups, 0.5, np.random.default_rng(0), swap)
    assert keep.shape == (G, L // 2)
    assert all(np.unique(r).size == L // 2 for r in keep)
    err = X[keep, 0].mean(axis=1) - X[:, 0].mean()
    assert abs(_z_score(err)) < 3.0


@pytest.mark.parametrize("swap", [True, False])
def test_compress_is_unbiased_over_seeds(swap):
    # n = 4^3: every halving input is even, so Compress inherits unbiasedness from halving
    X = _data(64, seed=1)
    err = np.array(
        [X[compress(X, Gaussian(1.0), g=1, seed=s, swap=swap), 0].mean() for s in range(200)]
    )
    err -= X[:, 0].mean()
    assert abs(_z_score(err)) < 3.0


def _record_deltas(monkeypatch):
    """Wrap the inner halving and the final KT so that each records its delta."""
    halves, thins = [], []
    orig_halve, orig_kt = compress_mod._halve_groups, compress_mod.kt

    def halve(kernel, X32, groups, delta, rng, swap, *rest):
        halves.append((groups.shape[0], groups.shape[1], delta))
        return orig_halve(kernel, X32, groups, delta, rng, swap, *rest)

    def thin(X, kernel, **kw):
        thins.append(kw["delta"])
        return orig_kt(X, kernel, **kw)

    monkeypatch.setattr(compress_mod, "_halve_groups", halve)
    monkeypatch.setattr(compress_mod, "kt", thin)
    return halves, thins


def test_compresspp_splits_delta_between_halving_and_thinning(monkeypatch):
    # Compress++ (Shetty, Dwivedi, Mackey 2022; goodpoints.compress.compresspp_kt): with
    # m final KT halving rounds and beta Compress halving levels per bin, the final KT
    # gets delta * m / (m + 2^m beta) and Compress the rest; a halving of L points gets
    # delta_c * L^2 / (4^(g+1) n beta), so the halving deltas add up to delta_c.
    halves, thins = _record_deltas(monkeypatch)
    n, g, bins, delta = 4096, 1, 4, 0.3
    X = _data(n)
    idx = compresspp(X, Gaussian(2.0), g=g, seed=0, delta=delta, num_bins=bins)
    assert idx.size == 64
    m = 2  # 256 Compress points (4 bins x 2^g sqrt(1024)) -> 64: two halving rounds
    beta = 4  # per bin: 1024 -> 256 -> 64 -> 16 -> leaves of 4^g = 4
    delta_kt = delta * m / (m + 2**m * beta)
    delta_c = delta - delta_kt
    assert thins == [pytest.approx(delta_kt, rel=1e-12)]
    # per level (4 bins): 4 halvings of 128 points, 16 of 64, 64 of 32, 256 of 16
    count = {}
    for G, L, d in halves:
        assert d == pytest.approx(delta_c * L**2 / (4 ** (g + 1) * n * beta), rel=1e-12)
        count[L] = count.get(L, 0) + G
    assert count == {128: 4, 64: 16, 32: 64, 16: 256}
    assert sum(G * d for G, _, d in halves) == pytest.approx(delta_c, rel=1e-12)


def test_compress_halving_deltas_follow_covered_points(monkeypatch):
    # any n: a halving node covering s input points gets delta * s / (sum of s over all
    # halving nodes). n = 80, g = 1: nodes of 80 (1), 20 (4) and 5 (16) points halve,
    # sum = 240, so deltas delta/3, delta/12 and delta/48.
    halves, _ = _record_deltas(monkeypatch)
    delta = 0.4
    compress(_data(80), Gaussian(2.0), g=1, seed=0, delta=delta)
    count = {}
    for G, _, d in halves:
        key = round(delta / d, 6)
        count[key] = count.get(key, 0) + G
    assert count == {3.0: 1, 12.0: 4, 48.0: 16}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"g": -1}, "g must"),
        ({"coreset_size": 5000}, "coreset_size"),
        ({"coreset_size": 0}, "coreset_size"),
        ({"num_bins": 0}, "num_bins"),
        ({"kernel": "nope"}, "kernel"),
    ],
)
def test_compresspp_bad_input(kwargs, match):
    kwargs = {"kernel": Gaussian(1.0), **kwargs}
    with pytest.raises(ValueError, match=match):
        compresspp(_data(100), **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        compresspp(np.full((10, 2), np.nan), Gaussian(1.0))


def test_stored_halvings_reuse_one_matrix_buffer(monkeypatch):
    # every stored batch writes into the same buffer; the matrices still match the kernel
    seen = []
    real = compress_mod.kernel_matrices

    def spy(kernel, Xg, out=None):
        K = real(kernel, Xg, out)
        seen.append(K.base if K.base is not None else K)
        np.testing.assert_allclose(K[0], kernel(Xg[0], Xg[0]), rtol=1e-5, atol=1e-6)
        return K

    monkeypatch.setattr(compress_mod, "kernel_matrices", spy)
    monkeypatch.setattr(compress_mod, "STORE", 64 * 64 * 2)  # two groups of 64 per batch
    X = _data(4096)
    compress_mod._halve_groups(
        Gaussian(2.0),
        X.astype(np.float32),
        np.arange(4096).reshape(-1, 64),
        0.5,
        np.random.default_rng(0),
        True,
    )
    assert len(seen) == 32 and all(b is seen[0] for b in seen)


def test_bins_of_one_call_share_the_matrix_buffer(monkeypatch):
    # a fresh buffer per bin is page-faulted anew (about a tenth of compresspp at 2^18)
    seen = []
    real = compress_mod.kernel_matrices

    def spy(kernel, Xg, out=None):
        K = real(kernel, Xg, out)
        seen.append(K.base if K.base is not None else K)  # held: no id reuse
        return K

    monkeypatch.setattr(compress_mod, "kernel_matrices", spy)
    X = _data(4096)
    one = compresspp(X, Gaussian(2.0), g=2, num_bins=4, seed=3)
    assert len(seen) > 4 and all(b is seen[0] for b in seen)
    # forked workers keep one buffer each and give the same coreset
    two = compresspp(X, Gaussian(2.0), g=2, num_bins=4, seed=3, workers=2)
    np.testing.assert_array_equal(two, one)

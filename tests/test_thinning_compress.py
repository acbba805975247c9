"""Compress / Compress++ for any n: sizes, eligibility of every point, quality, errors."""

import numpy as np
import pytest

from distillkit.thinning import Gaussian, compress, compresspp, iid, mmd


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


def test_symmetrised_halving_without_swap():
    X = _data(2048)
    idx = compresspp(X, Gaussian(2.0), g=2, seed=0, swap=False)
    assert idx.size == round(np.sqrt(2048))


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

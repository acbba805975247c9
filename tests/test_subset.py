"""Subset selection: exact sizes, per-class balance, methods and errors."""

import numpy as np
import pytest

from distillkit.data.subset import allocate, select, select_fraction


def _feats(n=600, d=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


def test_allocate_is_proportional_and_exact():
    counts = np.array([500, 300, 199, 1])
    for size in [1, 10, 77, 333, 1000]:
        a = allocate(counts, size)
        assert a.sum() == size and np.all(a <= counts)
        # largest-remainder rounding: within one of the exact quota
        assert np.all(np.abs(a - counts * size / counts.sum()) < 1)


@pytest.mark.parametrize("method", ["kt", "random"])
@pytest.mark.parametrize("size", [37, 100, 256])
def test_select_per_class_balance(method, size):
    X = _feats()
    labels = np.repeat([0, 1, 2], [300, 200, 100])
    idx = select(X, size, method=method, labels=labels, seed=1)
    assert idx.dtype == np.int64 and idx.size == size
    assert np.unique(idx).size == size and np.all(np.diff(idx) > 0)
    got = np.bincount(labels[idx], minlength=3)
    np.testing.assert_array_equal(got, allocate(np.array([300, 200, 100]), size))


@pytest.mark.parametrize("size", [1, 45, 299, 600])
def test_select_kt_exact_size_without_labels(size):
    idx = select(_feats(), size, method="kt")
    assert idx.size == size and np.unique(idx).size == size


def test_select_ignores_labels_when_not_per_class():
    X = _feats()
    labels = np.repeat([0, 1], [580, 20])
    idx = select(X, 50, labels=labels, per_class=False, method="random", seed=0)
    assert idx.size == 50


def test_select_full_and_fraction():
    X = _feats()
    np.testing.assert_array_equal(select(X, 10, method="full"), np.arange(600))
    assert select_fraction(X, 0.1, method="random").size == 60
    labels = np.repeat([0, 1], [400, 200])
    idx = select_fraction(X, 0.25, labels=labels, method="kt", bandwidth=2.0)
    assert idx.size == 150 and np.bincount(labels[idx]).tolist() == [100, 50]


def test_select_kt_is_deterministic_and_better_than_random():
    from distillkit.thinning import Gaussian, mmd

    X = _feats(1024, 2, seed=5)
    a = select(X, 32, method="kt", seed=3, bandwidth=2.0)
    np.testing.assert_array_equal(a, select(X, 32, method="kt", seed=3, bandwidth=2.0))
    k = Gaussian(2.0)
    rnd = np.mean([mmd(X, k, indices=select(X, 32, method="random", seed=s)) for s in range(5)])
    assert mmd(X, k, indices=a) < rnd


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"size": 0}, "size"),
        ({"size": 601}, "size"),
        ({"size": 10, "method": "herding"}, "method"),
        ({"size": 10, "labels": np.zeros(5)}, "labels"),
        ({"size": 10, "kernel": "rbf"}, "kernel"),
    ],
)
def test_select_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select(_feats(), **kwargs)
    with pytest.raises(ValueError, match="features"):
        select(np.full((5, 2), np.nan), 2)
    with pytest.raises(ValueError, match="fraction"):
        select_fraction(_feats(), 1.5)

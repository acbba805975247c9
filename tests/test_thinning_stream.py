"""Compress++ internals: stored halving matrices, streamed bins, worker processes."""

import importlib

import numpy as np
import pytest

from distillkit.thinning import IMQ, Gaussian, Laplace, Sinc, compresspp
from distillkit.thinning.halving import kernel_matrices
from distillkit.thinning.kt import _prepare

compress_mod = importlib.import_module("distillkit.thinning.compress")


def _data(n, d=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


@pytest.mark.parametrize(
    "kernel,d",
    [
        (Gaussian(1.5), 2),
        (Gaussian(3.0), 10),
        (Laplace(2.0), 2),
        (Laplace(3.0), 10),
        (IMQ(0.5, 1.0), 3),
        (Sinc(1.0), 2),
    ],
)
def test_kernel_matrices_symmetric_and_accurate(kernel, d):
    # 3 groups of 300 points: several 128-blocks, a ragged last block, batched groups
    Xg = np.random.default_rng(1).standard_normal((3, 300, d)).astype(np.float32)
    K = kernel_matrices(kernel, Xg)
    assert K.dtype == np.float32 and K.shape == (3, 300, 300)
    assert np.array_equal(K, np.swapaxes(K, 1, 2))  # bit for bit
    for g in range(3):
        x = Xg[g].astype(np.float64)
        diff = x[:, None, :] - x[None, :, :]
        want = kernel(x, x)  # float64 reference
        assert np.abs(K[g] - want).max() < 1e-6, np.abs(K[g] - want).max()
        assert diff.shape[0] == 300


def _group_mmd(X, groups, keep, sigma):
    """Mean over groups of the MMD between a group and its kept rows (direct formula)."""
    P = X[groups]
    K = np.exp(-((P[:, :, None] - P[:, None]) ** 2).sum(-1) / (2 * sigma**2))
    w = np.full(groups.shape, -1.0 / groups.shape[1])
    for g in range(len(groups)):  # rows of groups are sorted, so positions by search
        np.add.at(w[g], np.searchsorted(groups[g], keep[g]), 1.0 / keep.shape[1])
    return np.mean(np.sqrt(np.maximum(np.einsum("gi,gij,gj->g", w, K, w), 0.0)))


def test_stored_and_evaluated_halving_agree_in_quality(monkeypatch):
    # the stored-matrix halving and the on-the-fly one (STORE = 0) are the same
    # algorithm: averaged over 300 groups their MMDs to the group agree, and both are far
    # below a random half
    k = Gaussian(2.0)
    L, G = 64, 300
    X = _data(L * G, seed=4)
    _, kern, X32 = _prepare(X, k)
    groups = np.arange(L * G).reshape(G, L)
    rng = np.random.default_rng(0)
    res = {}
    for store in (compress_mod.STORE, 0):
        monkeypatch.setattr(compress_mod, "STORE", store)
        keep = compress_mod._halve_groups(kern, X32, groups, 0.5, rng, True)
        assert all(np.unique(r).size == L // 2 for r in keep)
        res[store] = _group_mmd(X, groups, keep, 2.0)
    rand = _group_mmd(X, groups, rng.permuted(groups, axis=1)[:, : L // 2], 2.0)
    a, b = res.values()
    assert a < 1.1 * b and b < 1.1 * a
    assert max(a, b) < 0.5 * rand


def test_compresspp_memmap_input_same_result(tmp_path):
    X = _data(5000, d=3, seed=2)
    path = tmp_path / "pts.npy"
    np.save(path, X)
    mm = np.load(path, mmap_mode="r")
    k = Gaussian(2.0)
    np.testing.assert_array_equal(compresspp(mm, k, g=2, seed=3), compresspp(X, k, g=2, seed=3))


def test_compresspp_rejects_nan_in_a_late_chunk(monkeypatch):
    monkeypatch.setattr(compress_mod, "_ROWS", 64)  # many validation chunks
    X = _data(1000)
    X[900, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compresspp(X, Gaussian(1.0), g=1)


def test_compresspp_workers_same_result():
    X = _data(6000, seed=5)
    k = Gaussian(2.0)
    one = compresspp(X, k, g=2, seed=7, num_bins=4)
    two = compresspp(X, k, g=2, seed=7, num_bins=4, workers=2)
    np.testing.assert_array_equal(one, two)
    with pytest.raises(ValueError, match="workers"):
        compresspp(X, k, workers=0)

"""Compress's stored-matrix halving pieces against plain float64 computations."""

import importlib

import numpy as np

from distillkit.thinning import Gaussian

halving = importlib.import_module("distillkit.thinning.halving")


def _matrices(G, L, seed=0):
    X = np.random.default_rng(seed).standard_normal((G, L, 2)).astype(np.float32)
    return halving.kernel_matrices(Gaussian(1.4), X)


def test_stored_sums_match_float64_sums_in_group_chunks(monkeypatch):
    # row means come from the two complementary columns (no pass of their own); groups go
    # a few at a time, rows in chunks: every sum is still the float64 sum of K's entries
    monkeypatch.setattr(halving, "_CHUNK", 16 * 64 * 2)  # 2 groups, 32 rows per GEMM
    K = _matrices(5, 64)
    rng = np.random.default_rng(1)
    V = np.zeros((5, 64, 3))
    for g in range(5):
        half = rng.permutation(64)[:32]
        V[g, half, 0] = 1.0
        V[g, :, 1] = 1.0 - V[g, :, 0]
        V[g, 1::2, 2] = 1.0
    mean, KV = halving.stored_sums(K, V)
    K64 = K.astype(np.float64)
    np.testing.assert_allclose(mean, K64.mean(axis=2), rtol=1e-15, atol=0)
    np.testing.assert_allclose(KV, K64 @ V, rtol=1e-15, atol=0)


def test_kernel_matrices_mirror_the_lower_triangle_of_diagonal_blocks(monkeypatch):
    # the masked copy puts each diagonal block's lower triangle above it, bit for bit
    monkeypatch.setattr(halving, "_TILE", 16)
    X = np.random.default_rng(2).standard_normal((3, 40, 2)).astype(np.float32)
    K = halving.kernel_matrices(Gaussian(0.9), X)
    np.testing.assert_array_equal(K, np.swapaxes(K, 1, 2))
    # the lower triangle is what the GEMM gave: compare with a float64 evaluation
    ref = Gaussian(0.9)(X.astype(np.float64), X.astype(np.float64))
    lo = np.tril_indices(40)
    np.testing.assert_allclose(K[:, lo[0], lo[1]], ref[:, lo[0], lo[1]], rtol=0, atol=1e-6)
    assert halving._upper(16).sum() == 16 * 15 // 2

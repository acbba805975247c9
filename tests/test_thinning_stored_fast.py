"""Compress's stored-matrix halving pieces against plain float64 computations."""

import importlib

import numpy as np

from distillkit.thinning import Gaussian

halving = importlib.import_module("distillkit.thinning.halving")


def _matrices(G, L, seed=0):
    X = np.random.default_rng(seed).standard_normal((G, L, 2)).astype(np.float32)
    return halving.kernel_matrices(Gaussian(1.4), X)


def test_stored_sums_match_float64_sums_in_group_chunks(monkeypatch):
    # groups go a few at a time, rows in chunks (odd-sized, so a chunk may start on an odd
    # row): every sum is still the float64 sum of K's entries
    monkeypatch.setattr(halving, "_CHUNK", 17 * 132)  # 2 groups, 17 rows per chunk
    K = _matrices(5, 66)
    rng = np.random.default_rng(1)
    w = np.where(rng.random((5, 66)) < 0.5, 1.0, -1.0)
    rows, Kw, sks = halving.stored_sums(K, w)
    K64 = K.astype(np.float64)
    np.testing.assert_allclose(rows, K64.sum(axis=2), rtol=1e-15, atol=0)
    # K w may cancel to near 0: an absolute bound of one ulp of a 66-term row sum
    np.testing.assert_allclose(Kw, np.einsum("gij,gj->gi", K64, w), rtol=1e-15, atol=1.5e-14)
    np.testing.assert_allclose(sks, K64[:, 1::2, 1::2].sum(axis=(1, 2)), rtol=1e-15, atol=0)


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


def test_swap_gets_the_float64_sums_of_the_chosen_candidate(monkeypatch):
    # the chosen candidate's kernel sums reach KT-SWAP exact in float64, also where the
    # standard-thinning half wins (forced here by a split that keeps one side of the line)
    compress = importlib.import_module("distillkit.thinning.compress")
    seen = {}

    def split_by_side(K, A, U):
        G, L, _ = K.shape
        order = np.argsort(Xg[..., 0], axis=1)  # children: left half and right half
        return np.stack([order[:, : L // 2], order[:, L // 2 :]], axis=1)

    def spy(kernel, X, best, meanK, passes, unique, K=None, ksum=None):
        seen.update(best=best.copy(), meanK=meanK, ksum=ksum, K=K.astype(np.float64))
        return best

    rng = np.random.default_rng(3)
    Xg = rng.standard_normal((4, 64, 2)).astype(np.float32)
    Xg[0] = np.sort(Xg[0], axis=0)  # group 0: paired neighbours, a good split
    monkeypatch.setattr(compress, "refine", spy)
    monkeypatch.setattr(compress, "halve_stored", split_by_side)
    compress._swap_halve_stored(Gaussian(1.0), Xg, 10.0, np.random.default_rng(0), [])
    best, K = seen["best"], seen["K"]
    std = np.arange(1, 64, 2)
    assert (best == std).all(axis=1).any()  # standard thinning beat a one-sided child
    np.testing.assert_allclose(seen["meanK"], K.mean(axis=2), rtol=1e-14, atol=0)
    want = np.stack([K[g][:, best[g]].sum(axis=1) for g in range(4)])
    np.testing.assert_allclose(seen["ksum"], want, rtol=1e-12, atol=1e-12)

"""KT-SPLIT's fast pieces against plain reference computations."""

import importlib

import numpy as np
import pytest

from distillkit.thinning import Gaussian
from distillkit.thinning.halving import pair_gram, pair_signs

kt_mod = importlib.import_module("distillkit.thinning.kt")


def _sym_kernel(G, R, seed=0):
    X = np.random.default_rng(seed).standard_normal((G, R, 2))
    return Gaussian(1.5)(X, X)


def test_pair_gram_matches_definition():
    K = _sym_kernel(3, 8).astype(np.float32)
    Gm = pair_gram(K)
    ref = np.empty((3, 4, 4))
    K64 = K.astype(np.float64)
    for g in range(3):
        for i in range(4):
            for p in range(4):
                d_i = K64[g, 2 * i + 1] - K64[g, 2 * i]
                d_p_b, d_p_a = 2 * p + 1, 2 * p
                ref[g, i, p] = d_i[d_p_b] - d_i[d_p_a]
    assert Gm.dtype == np.float64
    np.testing.assert_allclose(Gm, ref, rtol=0, atol=1e-12)


def _reference_signs(alpha, Gm, A, U):
    alpha = alpha.copy()
    G, P = alpha.shape
    E = np.empty((G, P))
    for g in range(G):
        for i in range(P):
            eps = 1.0 if U[g, i] <= 0.5 * (1.0 - alpha[g, i] / A[g, i]) else -1.0
            E[g, i] = eps
            alpha[g, i + 1 :] += eps * Gm[g, i, i + 1 :]
    return E, alpha


@pytest.mark.parametrize("groups", [1, 2, 3, 5])
def test_pair_signs_with_a_given_gram_matches_the_sequential_rule(groups):
    rng = np.random.default_rng(groups)
    K = _sym_kernel(groups, 40, seed=groups)
    Gm = pair_gram(K)
    alpha = rng.standard_normal((groups, 20)) * 0.3
    A = rng.random((groups, 20)) + 0.2
    U = rng.random((groups, 20))
    E_ref, alpha_ref = _reference_signs(alpha, Gm, A, U)
    al = alpha.copy()
    E = pair_signs(al, None, A, U, Gm)
    np.testing.assert_array_equal(E, E_ref)
    np.testing.assert_allclose(al, alpha_ref, rtol=0, atol=1e-12)
    # the kernel block itself gives the same signs
    np.testing.assert_array_equal(pair_signs(alpha.copy(), K, A, U), E_ref)


def test_block_gram_and_rows_match_the_float64_kernel():
    C, R = 3, 16
    X = np.random.default_rng(7).standard_normal((C, R, 2)).astype(np.float32)
    k = Gaussian(1.3)
    Ar, Fc, rho = kt_mod._gaussian_factors(k, X)
    M = np.zeros((C, R, 3))
    Gm = kt_mod._block_gram(Ar, Fc, rho, M)
    K = k(X.astype(np.float64), X.astype(np.float64))
    np.testing.assert_allclose(Gm, pair_gram(K), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(Gm, np.swapaxes(Gm, 1, 2))
    np.testing.assert_allclose(M[..., 1], K.sum(axis=2), rtol=1e-6)
    assert not M[..., [0, 2]].any()


def test_exp_tile_writes_into_a_given_buffer():
    rng = np.random.default_rng(3)
    Ar = rng.standard_normal((2, 6, 3)).astype(np.float32) * 0.3
    Fc = rng.standard_normal((2, 5, 3)).astype(np.float32) * 0.3
    buf = np.empty((2 * 6 * 5 + 7,), dtype=np.float32)
    out = kt_mod._exp_tile(Ar, Fc, buf)
    ref = np.exp(np.einsum("cik,cjk->cij", Ar.astype(np.float64), Fc.astype(np.float64)))
    assert out.shape == (2, 6, 5) and np.shares_memory(out, buf)
    np.testing.assert_allclose(out, ref, rtol=2e-6)


def test_block_gram_is_laid_out_pair_major():
    # pair_signs reads the Gram pair-major; a pair-major result needs no transposed copy
    C, R = 4, 12
    X = np.random.default_rng(5).standard_normal((C, R, 2)).astype(np.float32)
    Ar, Fc, rho = kt_mod._gaussian_factors(Gaussian(1.1), X)
    Gm = kt_mod._block_gram(Ar, Fc, rho, None)
    assert Gm.transpose(1, 2, 0).flags.c_contiguous
    K = Gaussian(1.1)(X.astype(np.float64), X.astype(np.float64))
    np.testing.assert_allclose(Gm, pair_gram(K), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(Gm, np.swapaxes(Gm, 1, 2))


def test_thresholds_resume_from_their_state():
    from distillkit.thinning.halving import thresholds

    for C in (2, 20):  # plain-float and numpy paths
        b2 = np.random.default_rng(C).random((C, 30)) * 0.4
        whole = thresholds(b2, 12.0)
        sig = np.zeros(C)
        parts = np.concatenate(
            [thresholds(b2[:, :11], 12.0, sig), thresholds(b2[:, 11:], 12.0, sig)], 1
        )
        np.testing.assert_array_equal(parts, whole)


def _split_both_ways(monkeypatch, n, d, m, seed):
    X = np.random.default_rng(seed).standard_normal((n, d))
    k = Gaussian(float(np.sqrt(2 * d)))
    count = [0]
    real = kt_mod._exp_tile

    def counting(Ar, Fc, buf=None):
        count[0] += Ar.shape[-2] * Fc.shape[-2] * (Ar.size // (Ar.shape[-2] * Ar.shape[-1]))
        return real(Ar, Fc, buf)

    monkeypatch.setattr(kt_mod, "_exp_tile", counting)
    out = []
    for fused in (3, 1):
        monkeypatch.setattr(kt_mod, "_FUSED", fused)
        count[0] = 0
        out.append((kt_mod.kt_split(X, k, m=m, seed=seed), count[0]))
    return out


@pytest.mark.parametrize("n,d,m", [(1024, 2, 4), (2048 + 37, 3, 3), (2048, 10, 2)])
def test_fused_rounds_match_round_by_round(monkeypatch, n, d, m):
    (fused, n_fused), (plain, n_plain) = _split_both_ways(monkeypatch, n, d, m, seed=n)
    np.testing.assert_array_equal(fused, plain)
    # rounds 2.. reuse round 1's tiles: about n^2 / 2 entries instead of n^2 (1 - 2^-m)
    assert n_fused < 0.8 * n_plain


def test_tile_gram_is_the_pair_gram_of_the_symmetrised_kernel():
    from distillkit.thinning.halving import tile_gram

    rng = np.random.default_rng(9)
    E = rng.random((3, 10, 10)).astype(np.float32)
    r = rng.random((3, 10)) + 0.5
    K = r[:, :, None] * E.astype(np.float64)
    ref = pair_gram(0.5 * (K + np.swapaxes(K, 1, 2)))
    np.testing.assert_allclose(tile_gram(E, r), ref, rtol=1e-13, atol=1e-15)


def test_pair_gram_of_many_groups_is_pair_major_and_exact():
    # pair_signs reads (P, P, G) rows: built group chunk by group chunk, no transposed copy
    K = _sym_kernel(19, 12, seed=3).astype(np.float32)
    Gm = pair_gram(K)
    assert Gm.transpose(1, 2, 0).flags.c_contiguous
    K64 = K.astype(np.float64)
    ref = K64[:, 1::2, 1::2] - K64[:, 1::2, 0::2] - K64[:, 0::2, 1::2] + K64[:, 0::2, 0::2]
    np.testing.assert_array_equal(Gm, ref)
    few = pair_gram(K[:2])  # a few groups stay group-major (row slices per group)
    assert few.flags.c_contiguous
    np.testing.assert_array_equal(few, ref[:2])

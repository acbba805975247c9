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


@pytest.mark.parametrize("groups", [1, 5])
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

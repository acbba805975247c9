"""KT-SWAP's refinement: row reuse across sweeps, checked against a plain greedy sweep."""

import importlib

import numpy as np
import pytest

from distillkit.thinning import Gaussian

swap = importlib.import_module("distillkit.thinning.swap")


def _counting_evaluator(monkeypatch):
    count = [0]
    real = swap._row_evaluator

    def make(kernel, X64):
        ev = real(kernel, X64)

        def rows(P, which=None):
            count[0] += P.shape[0] * P.shape[1]
            return ev(P, which)

        return rows

    monkeypatch.setattr(swap, "_row_evaluator", make)
    return count


def _plain_refine(X, S, k, passes, unique=False):
    # the definition: each slot in turn takes the point minimising the exact MMD^2
    n, S = X.shape[0], list(S)
    K = k(X, X)
    mean = K.mean(axis=1)

    def cost(T):
        return K[np.ix_(T, T)].mean() - 2.0 * mean[T].mean()

    for _ in range(passes):
        changed = False
        for t in range(len(S)):
            best, best_c = S[t], cost(S)
            for z in range(n):
                if unique and z in S[:t] + S[t + 1 :]:
                    continue
                T = S[:t] + [z] + S[t + 1 :]
                c = cost(T)
                if c < best_c - 1e-12:
                    best, best_c = z, c
            changed |= best != S[t]
            S[t] = best
        if not changed:
            break
    return np.array(S)


@pytest.mark.parametrize("unique", [False, True])
@pytest.mark.parametrize("stored", [False, True])
def test_refine_matches_plain_greedy_sweeps(unique, stored):
    X = np.random.default_rng(4).standard_normal((60, 2))
    k = Gaussian(1.5)
    S = np.arange(0, 60, 6)
    K = k(X, X)
    mean = K.mean(axis=1)
    kw = {"K": K[None], "ksum": K[:, S].sum(axis=1)[None]} if stored else {}
    out = swap.refine(k, X[None], S[None], mean[None], 3, unique, **kw)[0]
    np.testing.assert_array_equal(out, _plain_refine(X, S, k, 3, unique))


def test_refine_reuses_rows_of_unchanged_members(monkeypatch):
    X = np.random.default_rng(2).standard_normal((400, 2))
    k = Gaussian(1.5)
    S = np.arange(0, 400, 20)[None]
    mean = k(X, X).mean(axis=1)[None]
    count = _counting_evaluator(monkeypatch)
    one = swap.refine(k, X[None], S, mean, passes=1)
    rows_one = count[0]
    count[0] = 0
    three = swap.refine(k, X[None], S, mean, passes=3)
    assert not np.array_equal(one, three)  # a second sweep did run and change something
    # a second sweep needs rows only for the points that moved in, not for every slot
    assert count[0] - rows_one < S.shape[1]


def test_refine_takes_kernel_sums_from_the_member_rows(monkeypatch):
    # the sums over the coreset are the column sums of its members' rows: no second pass
    X = np.random.default_rng(6).standard_normal((300, 2))
    k = Gaussian(1.2)
    S = np.arange(0, 300, 15)[None]
    mean = k(X, X).mean(axis=1)[None]
    calls = [0]
    real = swap._rows

    def counting(kernel, P, Y):
        calls[0] += 1
        return real(kernel, P, Y)

    monkeypatch.setattr(swap, "_rows", counting)
    out = swap.refine(k, X[None], S, mean, passes=2)
    assert calls[0] == 0
    np.testing.assert_array_equal(out[0], _plain_refine(X, S[0], k, 2))

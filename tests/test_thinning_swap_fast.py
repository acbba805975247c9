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

        def rows(P, which=None, out=None):
            count[0] += P.shape[0] * P.shape[1]
            return ev(P, which) if out is None else ev(P, which, out)

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


def test_refine_evaluates_every_chunk_into_one_buffer(monkeypatch):
    # a fresh array per chunk of member rows is page-faulted anew (32 MB at L = 2^14)
    X = np.random.default_rng(8).standard_normal((400, 2))
    k = Gaussian(1.5)
    S = np.arange(0, 400, 10)
    mean = k(X, X).mean(axis=1)
    monkeypatch.setattr(swap, "_BLOCK", 400 * 8)  # chunks of 8 member rows
    outs = []
    real = swap._row_evaluator

    def make(kernel, X64):
        ev = real(kernel, X64)

        def rows(P, which=None, out=None):
            if P.shape[1] > 1:
                outs.append(out)
            return ev(P, which, out)

        return rows

    monkeypatch.setattr(swap, "_row_evaluator", make)
    got = swap.refine(k, X[None], S[None], mean[None], 2, True)[0]
    assert len(outs) >= 5 and all(o is not None and o is outs[0] for o in outs)
    np.testing.assert_array_equal(got, _plain_refine(X, S, k, 2, True))


def test_kernel_sums_come_in_small_pieces_of_the_same_blocks(monkeypatch):
    # pieces of at most ~_FINE values stay in cache; a one-row piece (a GEMV) appears only
    # where the block itself has one row, so the sums are those of whole blocks
    for n, step, fine in [(1025, 512, 64), (1026, 512, 64), (65, 64, 16), (7, 3, 2)]:
        pieces = swap._pieces(n, step, fine)
        assert [a for a, _ in pieces] == [0] + [b for _, b in pieces[:-1]] and pieces[-1][1] == n
        for a, b in pieces:
            block_rows = min(n, (a // step + 1) * step) - (a // step) * step
            assert b - a <= fine + 1 and (b - a > 1 or block_rows == 1)
    X = np.random.default_rng(9).standard_normal((300, 2))
    k = Gaussian(1.2)
    S = np.arange(0, 300, 3)
    sizes = []
    real = swap._rows

    def spy(kernel, P, Y):
        sizes.append(P.shape[-2] * Y.shape[-2])
        return real(kernel, P, Y)

    monkeypatch.setattr(swap, "_rows", spy)
    monkeypatch.setattr(swap, "_BLOCK", 100 * 30)  # member rows in chunks: ksum evaluated
    monkeypatch.setattr(swap, "_FINE", 100 * 8)
    mean = k(X, X).mean(axis=1)
    got = swap.refine(k, X[None], S[None], mean[None], 1, True)[0]
    assert sizes and max(sizes) <= 100 * 9
    np.testing.assert_array_equal(got, _plain_refine(X, S, k, 1, True))


def _stored_case(G, n=48, seed=10):
    rng = np.random.default_rng(seed)
    k = Gaussian(1.3)
    X = rng.standard_normal((G, n, 2))
    K = k(X, X)
    S = np.stack([rng.choice(n, 8, replace=False) for _ in range(G)])
    ksum = np.take_along_axis(K, S[:, None, :], axis=2).sum(axis=2)
    return k, X, K, S, K.mean(axis=2), ksum


@pytest.mark.parametrize("unique", [False, True])
def test_stored_refine_of_many_groups_matches_plain_greedy_sweeps(unique):
    # more groups than swap._FEW: the batched stored sweep, group for group the definition
    k, X, K, S, mean, ksum = _stored_case(7)
    out = swap.refine(k, X, S, mean, 3, unique, K=K, ksum=ksum)
    for g in range(7):
        np.testing.assert_array_equal(out[g], _plain_refine(X[g], S[g], k, 3, unique))


def test_stored_refine_runs_a_few_groups_one_by_one(monkeypatch):
    # up to swap._FEW groups, one group at a time (plain indices, no gathers); same result
    k, X, K, S, mean, ksum = _stored_case(7)
    together = swap.refine(k, X, S, mean, 3, True, K=K, ksum=ksum)
    calls = {"one": 0, "batch": 0}
    for name, key in [("_sweeps_one", "one"), ("_sweeps_batch", "batch")]:
        real = getattr(swap, name)

        def spy(*a, _real=real, _key=key):
            calls[_key] += 1
            return _real(*a)

        monkeypatch.setattr(swap, name, spy)
    few = swap.refine(k, X[:3], S[:3], mean[:3], 3, True, K=K[:3], ksum=ksum[:3])
    assert calls == {"one": 3, "batch": 0}
    np.testing.assert_array_equal(few, together[:3])


def test_one_evaluated_group_takes_the_scalar_path_with_the_same_steps(monkeypatch):
    # one group (kt, Compress's large halvings): scalar bookkeeping, bit for bit the steps
    # of the batched path (two copies of one group always accept together)
    X = np.random.default_rng(12).standard_normal((500, 2))
    k = Gaussian(1.1)
    S = np.arange(0, 500, 9)
    mean = k(X, X).mean(axis=1)
    calls = [0]
    real = swap._eval_sweeps_one

    def spy(*a):
        calls[0] += 1
        return real(*a)

    monkeypatch.setattr(swap, "_eval_sweeps_one", spy)
    for unique in [False, True]:
        one = swap.refine(k, X[None], S[None], mean[None], 3, unique)[0]
        two = swap.refine(k, np.stack([X, X]), np.stack([S, S]), np.stack([mean, mean]), 3, unique)
        np.testing.assert_array_equal(two[0], one)
        np.testing.assert_array_equal(two[1], one)
    assert calls[0] == 2

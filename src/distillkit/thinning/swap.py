"""KT-SWAP pieces: candidate scores, greedy trim and point-swap refinement (float64).

Why float64 here when the split uses float32 tiles: a swap's gain near a good coreset is
tiny (about MMD^2 / s, ~1e-8 at n = 2^14 and ~1e-10 between near-duplicates), while a
float32 kernel row carries ~1e-7 relative error, partly shared by the whole row (the
|x|^2 term of the distance GEMM). Comparing gains in float32 therefore swaps on rounding
noise: started from the full input (MMD 0) it used to swap 7% of the points onto
duplicates. The swap stage costs about s rows of length L per sweep against L^2 / 2
entries for the split, so float64 here is cheap.

The row means of the target kernel (meanK) come from the float32 split. Every kernel row
the swap evaluates is a full row over all L points, so it also yields that point's exact
row mean for free; the statistic is corrected with it before a swap is decided, and a
swap is made only when its exact float64 gain is positive (above ``_TOL``).
"""

from __future__ import annotations

import math

import numpy as np

from .kernels import Gaussian, Kernel

_BLOCK = 1 << 22  # elements per kernel block (32 MB in float64)
_TOL = 1e-12  # smallest accepted gain in MMD^2 * s (kernel values are O(1))
_FINE = 1 << 19  # elements per evaluated block that is reduced at once (4 MB, stays in cache)


def _rows(kernel: Kernel, P: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """float64 kernel rows k(P, Y); the distances use direct differences for d <= 8."""
    return kernel(P, Y, dtype=np.float64)


def candidate_scores(
    kernel: Kernel, Xg: np.ndarray, S: np.ndarray, meanK: np.ndarray
) -> np.ndarray:
    """MMD^2 (up to a constant) of each candidate: mean K[S,S] - 2 mean meanK[S].

    Xg (G, L, d), S (G, K, s) local positions, meanK (G, L) -> (G, K).
    """
    G, Kc, s = S.shape
    flat = S.reshape(G * Kc, s)
    gi = np.repeat(np.arange(G), Kc)
    out = np.empty(G * Kc)
    per = max(1, _BLOCK // (s * s))
    for c0 in range(0, G * Kc, per):
        c1 = min(G * Kc, c0 + per)
        pts = Xg[gi[c0:c1, None], flat[c0:c1]]
        kss = np.zeros(c1 - c0)
        step = max(1, _BLOCK // (s * (c1 - c0)))
        for r in range(0, s, step):
            kss += _rows(kernel, pts[:, r : r + step], pts).sum(axis=(1, 2))
        out[c0:c1] = kss / (s * s) - 2.0 * meanK[gi[c0:c1, None], flat[c0:c1]].mean(axis=1)
    return out.reshape(G, Kc)


def trim(kernel: Kernel, X: np.ndarray, S: np.ndarray, meanK: np.ndarray, size: int) -> np.ndarray:
    """Greedily drop the point whose removal lowers MMD the most until len(S) == size."""
    s = S.shape[0]
    if s <= size:
        return S
    P = X[S]
    r = np.zeros(s)
    step = max(1, _BLOCK // s)
    for i in range(0, s, step):
        r[i : i + step] = _rows(kernel, P[i : i + step], P).sum(1)
    dg = kernel.diag(P).astype(np.float64)
    mk = meanK[S].astype(np.float64)
    T, M = r.sum(), mk.sum()
    alive = np.ones(s, dtype=bool)
    for k in range(s, size, -1):
        score = (T - 2.0 * r + dg) / (k - 1) ** 2 - 2.0 * (M - mk) / (k - 1)
        score[~alive] = np.inf
        c = int(np.argmin(score))
        alive[c] = False
        T -= 2.0 * r[c] - dg[c]
        M -= mk[c]
        r -= _rows(kernel, P[c : c + 1], P)[0]
    return S[alive]


def _row_evaluator(kernel: Kernel, X64: np.ndarray):
    """f(P, which) = float64 rows k(P[g], X64[which][g]) over whole groups, (G', k, L).

    Smooth Gaussian rows (and any radial kernel in d > 8) come from one GEMM against a
    precomputed factor of X64; other kernels use direct differences, which stay exact at
    x = y where a cusp (Laplace, low-order Matern) would amplify GEMM cancellation.
    """
    if kernel.radial and (isinstance(kernel, Gaussian) or X64.shape[-1] > 8):
        F = kernel.factor(X64, dtype=np.float64)

        def rows(P, which=None, out=None):
            return kernel.eval_factor(P, F if which is None else F[which], out)

        return rows

    def rows_direct(P, which=None, out=None):  # out: only a hint, unused here
        return _rows(kernel, P, X64 if which is None else X64[which])

    return rows_direct


def _pieces(n: int, step: int, fine: int) -> list[tuple[int, int]]:
    """Row ranges of at most about ``fine`` rows within blocks of ``step`` rows of range(n).

    A piece has one row only where its whole block has (a one-row GEMM is a GEMV and may
    round differently), so the values match an evaluation block by block.
    """
    out = []
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        a = r0
        while a < r1:
            b = min(r1, a + fine)
            b = r1 if r1 - b == 1 else b
            out.append((a, b))
            a = b
    return out


def _moved_rows(evaluate, X64: np.ndarray, which: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rows of the points pos (local) of the groups which -> (len(which), L)."""
    G = X64.shape[0]
    if 2 * which.size < G:
        return evaluate(X64[which, pos][:, None, :], which)[:, 0, :]
    # most groups: evaluate all of them (no gathered copy of the factor) and pick the rows
    full = np.zeros(G, dtype=np.int64)
    full[which] = pos
    return evaluate(X64[np.arange(G), full][:, None, :])[which, 0, :]


def refine(
    kernel: Kernel,
    Xg: np.ndarray,
    S: np.ndarray,
    meanK: np.ndarray,
    passes: int = 3,
    unique: bool = False,
    K: np.ndarray | None = None,
    ksum: np.ndarray | None = None,
) -> np.ndarray:
    """KT-SWAP point refinement for G groups at once; Xg (G, L, d), S (G, s) local.

    Each slot in turn is given to the point that minimises the coreset's MMD to the group
    (distinct points when unique=True); a sweep over the slots repeats up to ``passes``
    times and stops once a sweep changes nothing. meanK (G, L) are the target row means.
    With stored kernel matrices K (G, L, L) (see halving.py) rows are read, not evaluated;
    meanK and ksum (G, L) = K[:, :, S].sum(2) must then come from the same K.
    """
    G, L, _ = Xg.shape
    s = S.shape[1]
    S = S.copy()
    gidx = np.arange(G)
    if K is not None:
        if ksum is None:
            ksum = np.take_along_axis(K, S[:, None, :], axis=2).sum(axis=2, dtype=np.float64)
        diag = K[:, np.arange(L), np.arange(L)].astype(np.float64)
        # C order: ksum may come strided from a fancy index, and every slot scans rows
        stat = np.ascontiguousarray(0.5 * diag - s * np.asarray(meanK, dtype=np.float64) + ksum)
        # a positive definite kernel has |K[i, j]| <= max of its diagonal
        return _refine_stored(K, S, stat, float(diag.max()), passes, unique)
    mk = np.array(meanK, dtype=np.float64)  # corrected to exact values as rows appear
    X64 = np.asarray(Xg, dtype=np.float64)
    ev = _row_evaluator(kernel, X64)

    bufs: dict[int, np.ndarray] = {}

    def evaluate(pos):
        # chunk rows go into a buffer reused by every chunk of the same size: a fresh
        # 32 MB array is page-faulted anew per chunk (a third of the row evaluation)
        m = pos.shape[1]
        if m not in bufs:
            bufs[m] = np.empty((G, m, L))
        return ev(X64[gidx[:, None], pos], out=bufs[m])

    def moved_rows(which, pos):
        return _moved_rows(ev, X64, which, pos)

    # evaluated rows come in chunks of slots
    chunk = int(max(1, min(s, _BLOCK // max(1, G * L))))
    # when every member's row fits one chunk, later sweeps reuse the rows and only a
    # point that moves in brings a new one (kt: s rows of length n per sweep saved)
    keep = chunk == s
    rows = evaluate(S) if keep else None
    if ksum is None and keep:  # the members' rows already hold the coreset sums
        ksum = rows.sum(axis=1)
    elif ksum is None:
        ksum = np.zeros((G, L))
        per = max(1, _BLOCK // max(1, L * s))
        for g0 in range(0, G, per):
            g1 = min(G, g0 + per)
            pts = X64[gidx[g0:g1, None], S[g0:g1]]
            step = max(1, _BLOCK // (s * (g1 - g0)))
            for a, b in _pieces(L, step, max(1, _FINE // (s * (g1 - g0)))):
                ksum[g0:g1, a:b] = _rows(kernel, X64[g0:g1, a:b], pts).sum(2)
    # stat[g, p] = s/2 * MMD^2 (up to a constant) if p were added to the current coreset:
    # in these units a row of K enters unscaled, so rows need no extra pass or rounding
    stat = 0.5 * kernel.diag(Xg) - s * mk + ksum
    tol = 0.5 * s * _TOL
    masked = stat  # with unique=True: stat with +inf at the members, kept in step with stat
    if unique:
        masked = stat.copy()
        masked[gidx[:, None], S] = np.inf
    if G == 1:  # kt and Compress's large halvings: the same steps on scalars and rows

        def moved_row(z):
            return ev(X64[0, z][None, None, :])[0, 0]

        state = (stat[0], masked[0], mk[0], None if rows is None else rows[0])
        _eval_sweeps_one(evaluate, moved_row, S, state, keep, chunk, passes, unique, tol)
        return S
    tmp = np.empty((G, L))
    for _ in range(max(1, passes)):
        changed = False
        for t0 in range(0, s, chunk):
            t1 = min(s, t0 + chunk)
            if not keep:
                rows = evaluate(S[:, t0:t1])  # members of slots t0..t1, fixed until their turn
            for t in range(t0, t1):
                c = S[:, t]
                row_c = rows[:, t - t0, :]
                # a full row gives the exact row mean of its point
                exact = row_c.mean(axis=1)
                stat[gidx, c] -= s * (exact - mk[gidx, c])
                mk[gidx, c] = exact
                if unique:  # slot t's point becomes a candidate again
                    masked[gidx, c] = stat[gidx, c]
                np.subtract(masked, row_c, out=tmp)  # the statistic without slot t's point
                z = tmp.argmin(axis=1)
                moved = np.nonzero(z != c)[0]
                if moved.size:
                    zm, cm = z[moved], c[moved]
                    row_z = moved_rows(moved, zm)
                    exact = row_z.mean(axis=1)
                    corr = -s * (exact - mk[moved, zm])
                    stat[moved, zm] += corr
                    if unique:
                        masked[moved, zm] += corr
                    tmp[moved, zm] += corr
                    mk[moved, zm] = exact
                    # the exact gain decides: rounding must never make a worse swap
                    ok = tmp[moved, cm] - tmp[moved, zm] > tol
                    acc = moved[ok]
                    if acc.size:
                        changed = True
                        S[acc, t] = z[acc]
                        if acc.size == G:  # in place, no gathered copies
                            stat += row_z
                            stat -= row_c
                            if unique:
                                masked += row_z
                                masked -= row_c
                        else:  # float64 difference: float32 rows would round it
                            diff = np.subtract(row_z[ok], row_c[acc], dtype=np.float64)
                            stat[acc] += diff
                            if unique:
                                masked[acc] += diff
                        if keep:  # after the update: row_c is a view of these rows
                            rows[acc, t] = row_z[ok]
                if unique:
                    masked[gidx, S[:, t]] = np.inf
        if not changed:
            break
    return S


def _eval_sweeps_one(evaluate, moved_row, S, state, keep, chunk, passes, unique, tol) -> None:
    """refine's sweeps for one group with evaluated rows; S (1, s) is updated in place.

    Bit for bit refine's batched steps at G = 1 (same operations in the same order), with
    plain indices instead of fancy-indexed arrays of one element: the per-slot numpy calls
    were most of the time at L = 2^14 (Compress++ at n = 2^20).
    """
    st, ms, mk, R = state
    Sg = S[0]
    s = Sg.shape[0]
    tmp = np.empty_like(st)
    for _ in range(max(1, passes)):
        changed = False
        for t0 in range(0, s, chunk):
            t1 = min(s, t0 + chunk)
            if not keep:
                R = evaluate(S[:, t0:t1])[0]  # members of slots t0..t1
            for t in range(t0, t1):
                c = int(Sg[t])
                row_c = R[t - t0]
                exact = row_c.mean()  # a full row gives the exact row mean of its point
                st[c] -= s * (exact - mk[c])
                mk[c] = exact
                if unique:  # slot t's point becomes a candidate again
                    ms[c] = st[c]
                np.subtract(ms, row_c, out=tmp)
                z = int(tmp.argmin())
                if z != c:
                    row_z = moved_row(z)
                    exact = row_z.mean()
                    corr = -s * (exact - mk[z])
                    st[z] += corr
                    if unique:
                        ms[z] += corr
                    tmp[z] += corr
                    mk[z] = exact
                    if tmp[c] - tmp[z] > tol:  # the exact gain decides
                        changed = True
                        Sg[t] = z
                        st += row_z
                        st -= row_c
                        if unique:
                            ms += row_z
                            ms -= row_c
                        if keep:  # after the update: row_c is a view of this row
                            R[t - t0] = row_z
                if unique:
                    ms[Sg[t]] = np.inf
        if not changed:
            break


_FEW = 4  # up to this many groups the stored swap runs group by group (fewer numpy calls)


def _refine_stored(
    K: np.ndarray, S: np.ndarray, stat: np.ndarray, kmax: float, passes: int, unique: bool
) -> np.ndarray:
    """refine's sweeps on stored matrices K (G, L, L) with |K| <= kmax; S (G, s) in place.

    stat (G, L) float64 as in refine. With unique=True the members carry an offset
    ``big`` instead of a second, +inf-masked copy of stat kept in step (one array to
    update per swap, not two): |stat| <= (2s + 1) kmax, so a member can never be the
    minimiser, and taking the offset off again is exact (Sterbenz). While a point is a
    member, each update rounds its value to ulp(big) <= 4e-15 s kmax instead of ulp(stat);
    the tolerance is 5e-13 s, so only gains within the accumulated rounding of the
    tolerance can be decided differently from exact arithmetic (no coreset changed in
    paired checks). An accepted swap adds the row difference, exact in float64, in one
    rounding, so the result does not depend on how the groups are batched.
    """
    G = stat.shape[0]
    s = S.shape[1]
    tol = 0.5 * s * _TOL
    big = 0.0
    if unique:
        big = 2.0 ** math.ceil(math.log2(8.0 * (s + 1) * max(kmax, 1e-300)))
        np.put_along_axis(stat, S, np.take_along_axis(stat, S, axis=1) + big, axis=1)
    few = G <= _FEW
    for g0, g1 in [(g, g + 1) for g in range(G)] if few else [(0, G)]:
        args = (K[g0:g1], S[g0:g1], stat[g0:g1], big, passes, tol)
        (_sweeps_one if few else _sweeps_batch)(*args)
    return S


def _sweeps_one(K, S, stat, big, passes, tol) -> None:
    """_refine_stored for one group (arrays with a leading axis of 1): scalar bookkeeping."""
    Kg, Sg, st = K[0], S[0], stat[0]
    tmp = np.empty_like(st)
    diff = np.empty_like(st)
    for _ in range(max(1, passes)):
        changed = False
        for t in range(Sg.shape[0]):
            c = int(Sg[t])
            row_c = Kg[c]
            st[c] -= big  # slot t's point becomes a candidate again
            np.subtract(st, row_c, out=tmp)  # the statistic without slot t's point
            z = int(tmp.argmin())
            if z != c and tmp[c] - tmp[z] > tol:
                np.subtract(Kg[z], row_c, out=diff, dtype=np.float64)
                st += diff
                Sg[t] = c = z
                changed = True
            st[c] += big
        if not changed:
            break


def _sweeps_batch(K, S, stat, big, passes, tol) -> None:
    """_refine_stored for G groups at once: one numpy pass per slot over all of them."""
    G, L = stat.shape
    gidx = np.arange(G)
    tmp = np.empty((G, L))
    for _ in range(max(1, passes)):
        changed = False
        for t in range(S.shape[1]):
            c = S[:, t]
            row_c = K[gidx, c]
            stat[gidx, c] -= big
            np.subtract(stat, row_c, out=tmp)
            z = tmp.argmin(axis=1)
            acc = np.nonzero(tmp[gidx, c] - tmp[gidx, z] > tol)[0]  # 0 where z == c
            if acc.size:
                za = z[acc]
                if 2 * acc.size > G:
                    # most groups swap: a whole-array update beats gathering and scattering
                    # rows; the others "swap" c for itself, an exact zero row (tmp is free here)
                    zr = c.copy()
                    zr[acc] = za
                    stat += np.subtract(K[gidx, zr], row_c, out=tmp, dtype=np.float64)
                else:
                    stat[acc] += np.subtract(K[acc, za], row_c[acc], dtype=np.float64)
                S[acc, t] = za
                changed = True
            stat[gidx, S[:, t]] += big
        if not changed:
            break

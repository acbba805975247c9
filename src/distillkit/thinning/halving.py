"""Kernel halving on stored float32 kernel matrices (Compress's many small halvings).

A Compress halving of L points needs the lower triangle of its kernel matrix for the
split, every full row for KT-SWAP and the row sums for its target. Computing the L x L
matrix once (float32) and reading it back is about 4x less kernel work than evaluating
tiles for the split and float64 rows for the swap, so batches of groups whose matrices
fit ``STORE`` elements take this path; larger halvings evaluate on the fly.

Precision: the matrix is exactly symmetric (direct differences are symmetric; other
kernels are symmetrised), and every sum read from it is accumulated in float64, so the
split, the candidate scores and the swap all work with one consistent kernel K~ (K
rounded entrywise to float32). Swap gains are then exact for K~; what was harmful
before was inconsistency between row means and swap rows, not the rounding itself.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .kernels import Gaussian, Kernel, sqdist

STORE = 1 << 26  # float32 elements of stored kernel matrices per batch (256 MB)
_PAIRS = 128  # pairs per block of the sequential split
_CHUNK = 1 << 18  # elements per cache-resident chunk (1 MB of float32)
_TILE = 128  # kernel matrix block edge
_FEW_GROUPS = 3  # up to this many groups the pair recursion runs group by group


@functools.lru_cache(maxsize=4)
def _upper(b: int) -> np.ndarray:
    """Mask of the entries above the diagonal of a b x b block."""
    return np.triu(np.ones((b, b), dtype=bool), 1)


def kernel_matrices(kernel: Kernel, Xg: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Symmetric float32 kernel matrices (G, L, L) of the groups Xg (G, L, d) float32.

    Only blocks on or below the diagonal are evaluated; each is mirrored above it, so K is
    symmetric bit for bit and half the kernel values are computed. Blocks of about 1 MB
    keep the distance and exp passes in cache. Gaussian distances come from one GEMM
    (smooth at 0); other radial kernels use direct differences, which stay exact at x = y
    where a cusp (Laplace, low-order Matern) would amplify GEMM cancellation.
    """
    G, L, d = Xg.shape
    # out: a reused float32 buffer of at least G L^2 elements; a fresh 256 MB array costs
    # a page fault per 4 KB on first touch (about a fifth of this function at L = 1024)
    K = np.empty((G, L, L), np.float32) if out is None else out[: G * L * L].reshape(G, L, L)
    # 128 x 128 blocks: numpy's transposed copy is 3x slower once a block leaves L1/L2
    bs = min(L, _TILE)
    gemm = isinstance(kernel, Gaussian)
    if gemm:
        x64 = Xg.astype(np.float64)
        sq = np.einsum("gld,gld->gl", x64, x64)[..., None]
        one = np.ones_like(sq)
        scale = -0.5 / float(kernel.sigma) ** 2
        A = np.concatenate([x64, sq, one], axis=-1).astype(np.float32)
        B = (scale * np.concatenate([-2.0 * x64, one, sq], axis=-1)).astype(np.float32)
        Bt = np.ascontiguousarray(np.swapaxes(B, 1, 2))
    # a few groups at a time: one (G, 128, 128) block of every group at once left the
    # cache at G = 64 (2.9 ns per matrix entry at L = 1024; same values either way)
    gstep = max(1, _CHUNK // (4 * bs * bs))
    buf = np.empty(min(G, gstep) * bs * bs, dtype=np.float32)
    for g0 in range(0, G, gstep):
        g1 = min(G, g0 + gstep)
        Kg = K[g0:g1]
        for i0 in range(0, L, bs):
            i1 = min(L, i0 + bs)
            for j0 in range(0, i0 + 1, bs):
                j1 = min(L, j0 + bs)
                if gemm:
                    # no clamp at 0: a rounding-positive exponent near x = y gives 1 + 1e-7,
                    # harmless since every consumer reads this same matrix
                    shape = (g1 - g0, i1 - i0, j1 - j0)
                    blk = buf[: math.prod(shape)].reshape(shape)
                    np.matmul(A[g0:g1, i0:i1], Bt[g0:g1, :, j0:j1], out=blk)
                    np.exp(blk, out=blk)
                elif kernel.radial and d <= 8:
                    blk = kernel.profile(sqdist(Xg[g0:g1, i0:i1], Xg[g0:g1, j0:j1]), d)
                elif kernel.radial:  # float64 GEMM distances, rounded once
                    D2 = sqdist(
                        Xg[g0:g1, i0:i1].astype(np.float64), Xg[g0:g1, j0:j1].astype(np.float64)
                    )
                    blk = kernel.profile(D2.astype(np.float32), d)
                else:
                    blk = kernel(Xg[g0:g1, i0:i1], Xg[g0:g1, j0:j1], dtype=np.float32)
                if j0 == i0:
                    # a GEMM may round (a, b) and (b, a) differently: mirror the lower triangle
                    # (a masked copy: 4x faster than fancy indexing of the triangle)
                    Kd = Kg[:, i0:i1, j0:j1]
                    Kd[...] = blk
                    np.copyto(Kd, np.swapaxes(blk, 1, 2), where=_upper(i1 - i0))
                else:
                    Kg[:, i0:i1, j0:j1] = blk
                    Kg[:, j0:j1, i0:i1] = np.swapaxes(blk, 1, 2)
    return K


def thresholds(b2: np.ndarray, log_mult: float, sig: np.ndarray | None = None) -> np.ndarray:
    """Self-balancing thresholds a_i per coreset (sequential sub-Gaussian recursion).

    b2 (C, h) squared pair distances. sig (C,), when given, is the recursion's state on
    entry and is updated in place, so a coreset's pairs may come in consecutive pieces.
    """
    C, h = b2.shape
    out = np.empty_like(b2)
    state = np.zeros(C) if sig is None else sig
    if C <= 16:
        # plain floats beat numpy on tiny arrays
        for c in range(C):
            sg = float(state[c])
            row = b2[c].tolist()
            res = [0.0] * h
            for i, bb in enumerate(row):
                t = math.sqrt(sg * bb * log_mult)
                thr = t if t > bb else bb
                if sg == 0.0:
                    sg = bb
                elif thr != 0.0:
                    upd = 1.0 + (bb - 2.0 * thr) * sg / (thr * thr)
                    if upd > 0.0:
                        sg += bb * upd
                res[i] = thr if thr != 0.0 else 1.0
            out[c] = res
            state[c] = sg
        return out
    sg = state.copy()
    for i in range(h):
        bb = b2[:, i]
        thr = np.maximum(np.sqrt(sg * bb * log_mult), bb)
        safe = np.where(thr > 0, thr, 1.0)
        upd = np.maximum(1.0 + (bb - 2.0 * thr) * sg / safe**2, 0.0)
        sg = np.where(sg == 0, bb, np.where(thr > 0, sg + bb * upd, sg))
        out[:, i] = safe
    state[:] = sg
    return out


def pair_gram(Kin: np.ndarray) -> np.ndarray:
    """G[i, p] = <k(x'_i) - k(x_i), k(x'_p) - k(x_p)> of a block's pairs, float64 (G, P, P).

    Row differences first (contiguous rows, exact in float64), then column differences:
    two passes instead of four strided quarter reads. Beyond _FEW_GROUPS groups the result
    is a view of a pair-major (P, P, G) array, which pair_signs reads without a transposed
    copy; it is built a few groups at a time so the temporaries stay in cache.
    """
    G, P = Kin.shape[0], Kin.shape[1] // 2
    if G <= _FEW_GROUPS:
        D = np.subtract(Kin[:, 1::2], Kin[:, 0::2], dtype=np.float64)
        return np.subtract(D[:, :, 1::2], D[:, :, 0::2])
    out = np.empty((P, P, G))
    gc = 8  # 2 MB of row differences at P = 128
    for g0 in range(0, G, gc):
        g1 = min(G, g0 + gc)
        D = np.subtract(Kin[g0:g1, 1::2], Kin[g0:g1, 0::2], dtype=np.float64)
        out[:, :, g0:g1] = np.subtract(D[:, :, 1::2], D[:, :, 0::2]).transpose(1, 2, 0)
    return out.transpose(2, 0, 1)


def tile_gram(E: np.ndarray, r: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Pair Gram (C, P, P) of the symmetrised kernel K = r_i E_ij, E (C, 2P, 2P) float32.

    The 1/2 of (G + G') / 2 rides on r: scaling by 1/2 is exact, so this equals halving
    the sum, one pass fewer.
    """
    G = np.subtract(E[:, 1::2, 1::2], E[:, 1::2, 0::2], dtype=np.float64)
    G *= r[:, 1::2, None] * 0.5
    H = np.subtract(E[:, 0::2, 0::2], E[:, 0::2, 1::2], dtype=np.float64)
    H *= r[:, 0::2, None] * 0.5
    G += H
    return np.add(G, np.swapaxes(G, 1, 2), out=out)


def pair_signs(
    alpha: np.ndarray, Kin: np.ndarray | None, A: np.ndarray, U: np.ndarray, Gm=None
) -> np.ndarray:
    """KT-SPLIT's sign of each pair in a block, in order -> (G, P) of +-1 (alpha updated in place).

    alpha (G, P): psi(x'_i) - psi(x_i) from earlier pairs; Kin (G, 2P, 2P) the block's kernel
    (or its pair_gram Gm); A, U (G, P) thresholds and uniforms. eps = +1 sends x' to child 0,
    which changes later pairs' alpha by Gm[i, p] = <k(x'_i) - k(x_i), k(x'_p) - k(x_p)>.
    """
    if Gm is None:
        Gm = pair_gram(Kin)
    n_groups, n_pairs = alpha.shape
    # eps = +1 iff U <= (1 - alpha / A) / 2, i.e. alpha <= A (1 - 2U) since A > 0
    thr = A * (1.0 - 2.0 * U)
    if n_groups <= _FEW_GROUPS:  # plain floats and row slices beat tiny numpy ops
        out = np.empty((n_groups, n_pairs))
        for c in range(n_groups):
            al, g = alpha[c], Gm[c]
            t_l = thr[c].tolist()
            e = [0.0] * n_pairs
            for i in range(n_pairs):
                if al[i] <= t_l[i]:
                    e[i] = 1.0
                    al[i + 1 :] += g[i, i + 1 :]
                else:
                    e[i] = -1.0
                    al[i + 1 :] -= g[i, i + 1 :]
            out[c] = e
        return out
    # pair-major copies: every step then reads and updates contiguous rows
    al = np.ascontiguousarray(alpha.T)
    Gt = np.ascontiguousarray(Gm.transpose(1, 2, 0))
    th = np.ascontiguousarray(thr.T)
    E = np.empty((n_pairs, n_groups))
    tmp = np.empty((n_pairs, n_groups))
    for i in range(n_pairs):
        e = E[i]
        np.copysign(1.0, th[i] - al[i], out=e)  # x - y is +0.0 when x == y: eps = +1
        rest = Gt[i, i + 1 :]
        t = tmp[: rest.shape[0]]
        np.multiply(rest, e, out=t)
        al[i + 1 :] += t
    alpha[:] = al.T
    return E.T.copy()


def halve_stored(K: np.ndarray, A: np.ndarray, U: np.ndarray) -> np.ndarray:
    """KT-SPLIT with one round on stored matrices K (G, L, L), L even.

    A (G, L/2) thresholds and U (G, L/2) uniforms per pair. Returns local positions
    (G, 2, L/2) of the two children, with the same decisions rule as kt._halve_batch.
    """
    G, L, _ = K.shape
    h = L // 2
    E = np.empty((G, h))
    w = np.zeros((G, L, 1), dtype=np.float32)  # +1 child 0, -1 child 1, 0 undecided
    for p0 in range(0, h, _PAIRS):
        p1 = min(h, p0 + _PAIRS)
        q0, q1 = 2 * p0, 2 * p1
        # contributions of all earlier pairs (their weights are final) to psi
        psi = np.matmul(K[:, q0:q1, :q0], w[:, :q0]).astype(np.float64)[..., 0]
        alpha = psi[:, 1::2] - psi[:, 0::2]
        E[:, p0:p1] = pair_signs(alpha, K[:, q0:q1, q0:q1], A[:, p0:p1], U[:, p0:p1])
        # eps = +1 sends the odd point x' to child 0
        w[:, q0 + 1 : q1 : 2, 0] = E[:, p0:p1]
        w[:, q0:q1:2, 0] = -E[:, p0:p1]
    even = np.arange(0, L, 2)
    plus = E > 0
    return np.stack([np.where(plus, even + 1, even), np.where(plus, even, even + 1)], axis=1)


def paired_b2(K: np.ndarray) -> np.ndarray:
    """|k(x_2i, .) - k(x_2i+1, .)|^2 per pair from stored matrices -> (G, L/2) float64."""
    L = K.shape[1]
    e = np.arange(0, L, 2)
    b2 = K[:, e, e].astype(np.float64) + K[:, e + 1, e + 1] - 2.0 * K[:, e, e + 1]
    return np.maximum(b2, 0.0)


def stored_sums(K: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row sums K @ 1, K @ w and the odd-odd sum std' K std of K (G, L, L), float64.

    w (G, L) are the split's signs (+1 child 0, -1 child 1), so K @ child = (K @ 1 +- K @ w)
    / 2; std marks the odd positions (the standard-thinning half). Each chunk of rows is
    converted once into a reused float64 buffer and reduced by two matrix-vector products:
    a three-column GEMM on a fresh copy took twice as long.
    """
    G, L, _ = K.shape
    rows, Kw, sks = np.empty((G, L)), np.empty((G, L)), np.zeros(G)
    std = np.zeros((L, 1))
    std[1::2] = 1.0
    w3 = np.ascontiguousarray(w, dtype=np.float64)[..., None]
    ones = np.ones_like(w3)
    # a few groups at a time, so that each product has at least 16 rows (at G = 64, L = 1024
    # one chunk over all groups made 4-row products, a third of the time in call overhead)
    gs = max(1, min(G, _CHUNK // (16 * L)))
    R = max(1, _CHUNK // (gs * L))
    buf = np.empty(gs * min(R, L) * L)
    for g0 in range(0, G, gs):
        g1 = min(G, g0 + gs)
        for r0 in range(0, L, R):
            r1 = min(L, r0 + R)
            B = buf[: (g1 - g0) * (r1 - r0) * L].reshape(g1 - g0, r1 - r0, L)
            np.copyto(B, K[g0:g1, r0:r1])
            np.matmul(B, w3[g0:g1], out=Kw[g0:g1, r0:r1, None])
            np.matmul(B, ones[g0:g1], out=rows[g0:g1, r0:r1, None])  # 1.6x np.sum's speed
            sks[g0:g1] += (B[:, (r0 + 1) % 2 :: 2] @ std).sum(axis=(1, 2))
    return rows, Kw, sks

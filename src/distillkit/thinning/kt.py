"""Kernel thinning: KT-SPLIT, KT-SWAP, target/root/power KT, KT+, and baselines.

Implementation notes
--------------------
* KT-SPLIT runs round by round; all coresets of a round are halved together (batched).
  Target KT with a Gaussian kernel runs rounds 1-3 in one sweep over round 1's tiles
  (_fused_rounds): same decisions, about half the kernel evaluations.
  Inside a halving, the pairs are processed in blocks: the kernel rows of a block against
  every earlier point of its coreset come from one matrix product, the contribution of
  earlier pairs to psi is one matrix-vector product, and only the within-block
  recursion is sequential. Only the lower triangle of each coreset's kernel matrix is
  ever evaluated and nothing of size n x n is stored.
* KT-SPLIT kernel blocks are float32 (3-4x cheaper exp). Each tile's sums come from a
  float32 GEMM over at most a few hundred columns and are accumulated across tiles in
  float64 (a float64 copy of every round-1 tile cost 8% of kt at n = 2^14 and showed no
  MMD gain over 24 paired seeds). KT-SWAP (swap.py) evaluates its rows in float64, corrects
  each point's row mean from its exact row and makes a swap only when its exact gain is
  positive, so a coreset as large as the input stays the input and rounding never makes a
  swap that raises the MMD.
* coreset_size == n returns every point (MMD 0) without running anything.
* In target KT the split blocks of round 1 cover the whole (lower-triangular) kernel
  matrix, so the row means KT-SWAP needs come for free.
* Any n: KT-SPLIT needs 2^m * floor(n/2^m) points. The r = n mod 2^m points left over
  are drawn uniformly at random (seeded) and sit out the split only: they are part of
  the target distribution (row means over all n points) and candidates in every swap.
* Any coreset size: m defaults to the largest value with floor(n/2^m) >= coreset_size;
  the best candidate is trimmed to the exact size by greedy MMD-optimal point removal,
  then refined by KT-SWAP at that size.
"""

from __future__ import annotations

import math

import numpy as np

from .halving import pair_signs, thresholds, tile_gram
from .kernels import Gaussian, Kernel, SumKernel, check_points, single_thread_blas, sqdist
from .mmd import resolve_kernel
from .swap import candidate_scores, refine, trim

__all__ = [
    "kt",
    "kt_split",
    "kt_swap",
    "standard_thin",
    "iid",
    "split_kernel_for",
]

_BLOCK = 1 << 22  # elements per float32 kernel block (16 MB)
_TILE = 1 << 16  # elements per cache-resident kernel tile in KT-SPLIT (256 KB)
_FUSED = 3  # KT-SPLIT rounds of target KT that share round 1's kernel tiles
SPLITS = ("target", "root", "power", "plus")


# ---------------------------------------------------------------- helpers
def _rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


def _two_blocks(k1: Kernel, k2: Kernel | None, A: np.ndarray, B: np.ndarray):
    """k1(A, B) and k2(A, B) in float32, sharing the distance computation when possible."""
    if k2 is None:
        return k1(A, B, dtype=np.float32), None
    if k1.radial and k2.radial:
        D2 = sqdist(A, B)
        d = A.shape[-1]
        return k1.profile(D2.copy(), d), k2.profile(D2, d)
    return k1(A, B, dtype=np.float32), k2(A, B, dtype=np.float32)


def _gaussian_factors(kernel: Kernel, Xp: np.ndarray):
    """Row-factored Gaussian tiles: k(x, y) = rho(x) * exp((2 x.y - |y|^2) / (2 sigma^2)).

    With the row term |x|^2 rounded to float32 inside the GEMM, every entry of a row shares
    one relative error (~1e-7 at |x|^2 / sigma^2 ~ 1), which biases the row means KT-SWAP
    relies on (measured: 5-10% worse MMD at n = 2^14). Applying rho in float64 after the
    sums leaves only per-entry rounding, which averages out. Returns None when the
    unscaled factor could overflow float32 (far outliers) or the kernel is not Gaussian.
    """
    if not isinstance(kernel, Gaussian):
        return None
    inv = 1.0 / float(kernel.sigma) ** 2
    x64 = Xp.astype(np.float64)
    half = 0.5 * inv * np.einsum("...i,...i->...", x64, x64)
    if half.size == 0 or half.max() > 60.0:
        return None
    ones = np.ones(Xp.shape[:-1] + (1,), dtype=np.float32)
    Ar = np.concatenate([Xp, ones], axis=-1)
    Fc = np.concatenate([x64 * inv, -half[..., None]], axis=-1).astype(np.float32)
    return Ar, Fc, np.exp(-half)


def _exp_tile(Ar: np.ndarray, Fc: np.ndarray, buf: np.ndarray | None = None) -> np.ndarray:
    """exp(Ar . Fc') in float32, written into the front of buf when given.

    A reused buffer stays in cache and skips a fresh allocation per tile (measured 0.55
    against 0.75 ns per entry for GEMM + exp).
    """
    shape = Ar.shape[:-1] + Fc.shape[-2:-1]
    D = None if buf is None else buf[: math.prod(shape)].reshape(shape)
    D = np.matmul(Ar, np.swapaxes(Fc, -1, -2), out=D)
    return np.exp(D, out=D)


def _block_gram(Ar: np.ndarray, Fc: np.ndarray, rho: np.ndarray, M: np.ndarray | None):
    """Pair Gram matrices (C, P, P) of the symmetrised in-block kernel rho_i exp(Ar_i . Fc_j).

    With M given, adds the block's row sums to M[..., 1]. The block's own psi weights are
    still 0, so it adds nothing else. The result is a view of a pair-major (P, P, C) array,
    the layout pair_signs steps through, so it needs no transposed copy. With K = rho E,
    G[i, p] = rho(x'_i) (E[x'_i, x'_p] - E[x'_i, x_p]) + rho(x_i) (E[x_i, x_p] - E[x_i, x'_p])
    touches quarter-size float64 arrays only. Groups go in chunks of about 1 MB so the
    temporaries stay in cache (at C = 64 one (C, 256, 256) float64 pass was 6 ns/entry).
    """
    C, R, _ = Ar.shape
    P = R // 2
    Gt = np.empty((P, P, C))
    Gm = Gt.transpose(2, 0, 1)
    step = max(1, (1 << 16) // (R * R))
    buf = np.empty(min(C, step) * R * R, dtype=np.float32)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        E = _exp_tile(Ar[c0:c1], Fc[c0:c1], buf)
        r = rho[c0:c1]
        if M is not None:  # rows of the symmetrised block: mean of row and column sums
            rows = r * E.sum(axis=2, dtype=np.float64)
            cols = np.matmul(r[:, None, :], E.astype(np.float64))[:, 0, :]
            M[c0:c1, :, 1] += 0.5 * (rows + cols)
        tile_gram(E, r, Gm[c0:c1])
    return Gm


def _halve_batch(
    Xp: np.ndarray,
    kernel: Kernel,
    log_mult: float,
    rng: np.random.Generator,
    mean_kernel: Kernel | None = None,
    mean_acc: np.ndarray | None = None,
    sums: bool = False,
):
    """Halve C coresets at once; Xp is (C, s, d) float32 with s even.

    Returns local positions (C, 2, s/2) of the two children. If mean_acc (C, s) is given,
    adds the row sums of the (mean_kernel or kernel) matrix of each coreset to it. With
    sums=True also returns (C, 3) kernel sums over child 0, child 1 and the odd positions
    (the standard-thinning half), derived from the same blocks at no extra kernel cost.
    """
    C, s, _ = Xp.shape
    h = s // 2
    b2 = kernel.diag(Xp[:, 0::2]) + kernel.diag(Xp[:, 1::2])
    b2 = b2 - 2.0 * kernel.paired(Xp[:, 0::2].astype(np.float64), Xp[:, 1::2].astype(np.float64))
    b2 = np.maximum(b2, 0.0)
    A = thresholds(b2, log_mult)
    U = rng.random((C, h))
    E = np.empty((C, h))
    # columns: psi weights (child 0 = +1, child 1 = -1, unprocessed = 0), ones, odd positions
    W = np.zeros((C, s, 3), dtype=np.float32)
    W[:, :, 1] = 1.0
    W[:, 1::2, 2] = 1.0
    tot = np.zeros(C)  # 1'K1
    one_w = np.zeros(C)  # 1'Kw
    wkw = np.zeros(C)  # w'Kw
    uku = np.zeros(C)  # u'Ku
    B = int(max(8, min(256, _BLOCK // max(1, 2 * C * s))))
    fact = _gaussian_factors(kernel, Xp) if mean_kernel is None else None
    # columns the off-diagonal tiles must multiply: psi only, unless row sums are wanted
    nw = 3 if sums else (2 if mean_acc is not None else 1)
    tile_buf = W64 = None
    for p0 in range(0, h, B):
        p1 = min(h, p0 + B)
        q0, q1 = 2 * p0, 2 * p1
        rows_x = Xp[:, q0:q1]
        # column tiles of ~256 KB keep each kernel tile in L2 for the exp and the GEMMs
        # (measured 1.3x faster than 1 MB tiles); M accumulates psi over earlier
        # points, full row sums and K u.
        T = int(max(128, _TILE // max(1, C * (q1 - q0))))
        M = np.zeros((C, q1 - q0, 3))
        Gm = None
        if fact is not None:
            Ar, Fc, rho = fact
            rho_r = rho[:, q0:q1]
            Mt = M[..., :nw]
            if mean_acc is not None and q0:
                W64 = W[:, :q0, :nw].astype(np.float64)  # converted once per block
            if tile_buf is None or tile_buf.size < C * (q1 - q0) * T:
                tile_buf = np.empty(C * (q1 - q0) * T, dtype=np.float32)
            for j in range(0, q0, T):
                j1 = min(q0, j + T)
                Kt = _exp_tile(Ar[:, q0:q1], Fc[:, j:j1], tile_buf)
                if mean_acc is None:
                    Mt += np.matmul(Kt, W[:, j:j1, :nw])
                else:  # Compress's stored sums: float64 sums of the float32 entries
                    Kt = Kt.astype(np.float64)
                    Mt += np.matmul(Kt, W64[:, j:j1])
                    mean_acc[:, j:j1] += np.matmul(rho_r[:, None, :], Kt)[:, 0, :]
            M *= rho_r[..., None]  # the row factor, applied once per block in float64
            if sums:
                Kin = _exp_tile(Ar[:, q0:q1], Fc[:, q0:q1]).astype(np.float64)
                Kin *= rho_r[..., None]
                Kin = 0.5 * (Kin + np.swapaxes(Kin, 1, 2))
                M += np.matmul(Kin, W[:, q0:q1])
            else:
                Kin = None
                Gm = _block_gram(
                    Ar[:, q0:q1], Fc[:, q0:q1], rho_r, M if mean_acc is not None else None
                )
            psi, rows = M[..., 0], M[..., 1]
            if mean_acc is not None:
                mean_acc[:, q0:q1] += rows
        else:
            mrow = None if mean_kernel is None else np.zeros((C, q1 - q0))
            for j in range(0, q0, T):
                j1 = min(q0, j + T)
                Kt, Mt = _two_blocks(kernel, mean_kernel, rows_x, Xp[:, j:j1])
                if mean_acc is None or Mt is not None:
                    M[..., :nw] += np.matmul(Kt, W[:, j:j1, :nw])
                else:
                    Kt = Kt.astype(np.float64)
                    M += np.matmul(Kt, W[:, j:j1])
                    mean_acc[:, j:j1] += Kt.sum(axis=1)
                if Mt is not None:
                    Mt = Mt.astype(np.float64)
                    mean_acc[:, j:j1] += Mt.sum(axis=1)
                    mrow += Mt.sum(axis=2)
            Kq, Mq = _two_blocks(kernel, mean_kernel, rows_x, rows_x)
            Kin = Kq.astype(np.float64)
            if mean_acc is not None or sums:
                M += np.matmul(Kin, W[:, q0:q1])
            psi, rows = M[..., 0], M[..., 1]
            if mean_acc is not None:
                if Mq is None:
                    mean_acc[:, q0:q1] += rows
                else:
                    mean_acc[:, q0:q1] += mrow + Mq.astype(np.float64).sum(axis=2)
        alpha = psi[:, 1::2] - psi[:, 0::2]
        E[:, p0:p1] = pair_signs(alpha, Kin, A[:, p0:p1], U[:, p0:p1], Gm)
        # eps = +1 sends x' to child 0, which adds k(x') - k(x) to psi
        W[:, q0 + 1 : q1 : 2, 0] = E[:, p0:p1]
        W[:, q0:q1:2, 0] = -E[:, p0:p1]
        if sums:
            wb = W[:, q0:q1, 0].astype(np.float64)
            ub = W[:, q0:q1, 2].astype(np.float64)
            kin_w = np.matmul(Kin, wb[:, :, None])[..., 0]
            kin_u = np.matmul(Kin, ub[:, :, None])[..., 0]
            tot += 2.0 * rows.sum(axis=1) - Kin.sum(axis=(1, 2))
            one_w += psi.sum(axis=1) + (wb * rows).sum(axis=1)
            wkw += 2.0 * (wb * psi).sum(axis=1) + (wb * kin_w).sum(axis=1)
            uku += 2.0 * (ub * M[..., 2]).sum(axis=1) - (ub * kin_u).sum(axis=1)
    even = np.arange(0, 2 * h, 2)
    plus = E > 0
    child0 = np.where(plus, even + 1, even)
    child1 = np.where(plus, even, even + 1)
    pos = np.stack([child0, child1], axis=1)
    if not sums:
        return pos
    s00 = 0.25 * (tot + 2.0 * one_w + wkw)
    s11 = 0.25 * (tot - 2.0 * one_w + wkw)
    return pos, np.stack([s00, s11, uku], axis=1)


def _fused_rounds(
    Xp: np.ndarray,
    kernel: Kernel,
    log_mults: list[float],
    rng: np.random.Generator,
    mean_acc: np.ndarray | None,
) -> np.ndarray | None:
    """The first len(log_mults) KT-SPLIT rounds in one sweep over round 1's row blocks.

    A round-j coreset is a subset of round 1's points, so the row tiles that round 1
    evaluates against all earlier points also give round j's psi: one weight column per
    round-j coreset, zero off its members. Each block runs its rounds in turn; a round-j
    coreset gets (block rows) / 2^(j-1) of the block's points, always whole pairs; only its
    small in-block tile is evaluated anew. Decisions follow the same rule and uniforms as
    round by round; only float32 sums are grouped differently.
    Xp (n, d) float32 -> local indices (2^levels, n / 2^levels), or None (not Gaussian).
    """
    n = Xp.shape[0]
    fact = _gaussian_factors(kernel, Xp)
    if fact is None:
        return None
    Ar, Fc, rho = fact
    levels = len(log_mults)
    Us = [rng.random((2**j, n >> (j + 1))) for j in range(levels)]  # the round-by-round draws
    sig = [np.zeros(2**j) for j in range(levels)]
    nw = 2**levels  # columns: round-1 psi, ones, then 2^j for the coresets of round j + 1
    W = np.zeros((n, nw), dtype=np.float32)
    W[:, 1] = 1.0
    cols = [np.zeros(1, dtype=np.int64)] + [2**j + np.arange(2**j) for j in range(1, levels)]
    members = [np.arange(n)[None]] + [
        np.empty((2**j, n >> j), np.int64) for j in range(1, levels + 1)
    ]
    B = int(max(8, min(256, _BLOCK // max(1, n))))
    B = 1 << (B.bit_length() - 1)  # a power of two: every round gets whole pairs per block
    T = int(max(128, _TILE // (2 * B)))
    buf = np.empty(2 * B * T, dtype=np.float32)
    for p0 in range(0, n // 2, B):
        q0, q1 = 2 * p0, min(n, 2 * p0 + 2 * B)
        R = q1 - q0
        rho_r = rho[q0:q1]
        rho_r32 = rho_r.astype(np.float32)
        M = np.zeros((R, nw))
        for j in range(0, q0, T):
            j1 = min(q0, j + T)
            Kt = _exp_tile(Ar[q0:q1], Fc[j:j1], buf)
            M += Kt @ W[j:j1]
            if mean_acc is not None:
                mean_acc[j:j1] += rho_r32 @ Kt
        M *= rho_r[:, None]
        Ein = _exp_tile(Ar[q0:q1], Fc[q0:q1])
        if mean_acc is not None:  # rows of the symmetrised block: mean of row and column sums
            rows = rho_r * Ein.sum(axis=1, dtype=np.float64)
            M[:, 1] += 0.5 * (rows + rho_r @ Ein.astype(np.float64))
            mean_acc[q0:q1] += M[:, 1]
        for lev in range(levels):
            Rj = R >> lev
            at = q0 >> lev
            pts = members[lev][:, at : at + Rj]
            loc = pts - q0
            psi = M[loc, cols[lev][:, None]]
            ev, od = pts[:, 0::2], pts[:, 1::2]
            b2 = kernel.diag(Xp[ev]) + kernel.diag(Xp[od])
            b2 = b2 - 2.0 * kernel.paired(Xp[ev].astype(np.float64), Xp[od].astype(np.float64))
            A = thresholds(np.maximum(b2, 0.0), log_mults[lev], sig[lev])
            if lev == 0:
                Gm = tile_gram(Ein[None], rho_r[None])
            else:  # a fresh tile of the coresets' points beats a 2-d gather from Ein
                Gm = tile_gram(_exp_tile(Ar[pts], Fc[pts]), rho[pts])
            U = Us[lev][:, at // 2 : at // 2 + Rj // 2]
            E = pair_signs(psi[:, 1::2] - psi[:, 0::2], None, A, U, Gm)
            # eps = +1 sends the odd point x' to child 0
            W[od, cols[lev][:, None]] = E
            W[ev, cols[lev][:, None]] = -E
            plus = E > 0
            nxt = members[lev + 1][:, at // 2 : at // 2 + Rj // 2]
            nxt[0::2] = np.where(plus, od, ev)
            nxt[1::2] = np.where(plus, ev, od)
    return members[levels]


def _split_rounds(
    X32: np.ndarray,
    ids: np.ndarray,
    kernel: Kernel,
    m: int,
    delta: float,
    rng: np.random.Generator,
    mean_kernel: Kernel | None = None,
    mean_acc: np.ndarray | None = None,
) -> np.ndarray:
    """m halving rounds of the points ids (length divisible by 2^m) -> (2^m, len/2^m)."""
    n_split = ids.shape[0]
    P = ids[None, :]
    first = 1
    if (
        mean_kernel is None and m >= 2 and _FUSED > 1
    ):  # target KT: the first rounds share round 1's tiles
        levels = min(m, _FUSED)
        lm = [2.0 * math.log(2.0 * n_split * m / (delta * 2**j)) for j in range(levels)]
        acc = None if mean_acc is None else mean_acc[0]
        local = _fused_rounds(X32[ids], kernel, lm, rng, acc)
        if local is not None:
            P, first = ids[local], levels + 1
    for j in range(first, m + 1):
        # delta_i = delta * 2^(j-1) / (m n) for every pair of round j (as in the paper)
        log_mult = 2.0 * math.log(2.0 * n_split * m / (delta * 2 ** (j - 1)))
        acc = mean_acc if j == 1 else None
        pos = _halve_batch(X32[P], kernel, log_mult, rng, mean_kernel if j == 1 else None, acc)
        C, _, h = pos.shape
        P = np.take_along_axis(P, pos.reshape(C, 2 * h), axis=1).reshape(2 * C, h)
    return P


def standard_thin(
    X: np.ndarray, coreset_size: int | None = None, m: int | None = None
) -> np.ndarray:
    """Every t-th point counted back from the end (t = 2^m or n // coreset_size)."""
    X = check_points(X)
    n = X.shape[0]
    size, m = _resolve_sizes(n, coreset_size, m)
    step = 2**m if coreset_size is None else max(1, n // size)
    return np.sort(n - 1 - step * np.arange(size, dtype=np.int64))


def iid(
    X: np.ndarray, coreset_size: int, seed: int | None = None, replace: bool = False
) -> np.ndarray:
    """Uniform random subsample (without replacement unless replace=True).

    Only the number of rows of X is used, so a large memory-mapped X is not read.
    """
    if not (isinstance(X, np.ndarray) and X.ndim == 2 and X.size):
        X = check_points(X)
    n = X.shape[0]
    size, _ = _resolve_sizes(n, coreset_size, None)
    return np.sort(_rng(seed).choice(n, size, replace=replace).astype(np.int64))


def _resolve_sizes(n: int, coreset_size: int | None, m: int | None) -> tuple[int, int]:
    if coreset_size is not None:
        if isinstance(coreset_size, bool) or int(coreset_size) != coreset_size:
            raise ValueError(f"coreset_size must be an integer, got {coreset_size!r}")
        coreset_size = int(coreset_size)
        if not 1 <= coreset_size <= n:
            raise ValueError(f"coreset_size must be in [1, n={n}], got {coreset_size}")
    if m is not None:
        if isinstance(m, bool) or int(m) != m or m < 0:
            raise ValueError(f"m must be a non-negative integer, got {m!r}")
        m = int(m)
        if 2**m > n:
            raise ValueError(f"m={m} needs at least 2^m = {2**m} points, got n={n}")
    if coreset_size is None and m is None:
        coreset_size = max(1, int(round(math.sqrt(n))))
    if coreset_size is None:
        return n // 2**m, m
    if m is None:
        m = 0
        while n // 2 ** (m + 1) >= coreset_size:
            m += 1
    elif n // 2**m < coreset_size:
        raise ValueError(
            f"coreset_size={coreset_size} is larger than n // 2^m = {n // 2**m} (m={m})"
        )
    return coreset_size, m


def split_kernel_for(kernel: Kernel, split: str, d: int, alpha: float | None = None) -> Kernel:
    """Split kernel of target / root / power KT or KT+ for a fitted target kernel."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    if split == "target":
        return kernel
    if split == "root":
        return kernel.sqrt(d)
    a = kernel.default_alpha(d) if alpha is None else float(alpha)
    kp = kernel.power(a, d)
    if split == "power":
        return kp
    return SumKernel((kernel, kp), (1.0 / kernel.sup_norm, 1.0 / kp.sup_norm))


def _prepare(X, kernel):
    X = check_points(X)
    kernel = resolve_kernel(kernel, X)
    Xc = X - X.mean(axis=0)  # centring keeps float32 distances accurate
    return X, kernel, Xc.astype(np.float32)


def _split_with_leftovers(X32, split_k, m, delta, rng, mean_kernel, want_mean):
    n = X32.shape[0]
    n_split = 2**m * (n // 2**m)
    if n_split < n:
        left = np.sort(rng.choice(n, n - n_split, replace=False))
        keep = np.ones(n, dtype=bool)
        keep[left] = False
        ids = np.nonzero(keep)[0]
    else:
        left = np.empty(0, dtype=np.int64)
        ids = np.arange(n)
    acc = np.zeros((1, n_split)) if want_mean else None
    cands = _split_rounds(X32, ids, split_k, m, delta, rng, mean_kernel, acc)
    return cands.astype(np.int64), ids, left, acc


def _row_means(kernel, X32, ids, left, acc):
    """Row means of the target kernel over all n points, reusing the split sums."""
    n = X32.shape[0]
    meanK = np.zeros(n)
    meanK[ids] = acc[0]
    if left.size:
        step = max(1, _BLOCK // n)
        for i in range(0, left.size, step):
            R = kernel(X32[left[i : i + step]], X32)  # float64: few rows, feeds KT-SWAP
            meanK[left[i : i + step]] = R.sum(1, dtype=np.float64)
            meanK[ids] += R[:, ids].sum(0, dtype=np.float64)
    return meanK / n


def _full_row_means(kernel, X32):
    n = X32.shape[0]
    out = np.empty(n)
    step = max(1, _BLOCK // n)
    for i in range(0, n, step):
        out[i : i + step] = kernel(X32[i : i + step], X32).sum(1)  # float64 for KT-SWAP
    return out / n


@single_thread_blas
def kt_split(
    X: np.ndarray, kernel: Kernel | str, m: int, delta: float = 0.5, seed: int | None = None
) -> np.ndarray:
    """KT-SPLIT: 2^m candidate coresets (rows) of floor(n/2^m) int64 indices each."""
    X, kernel, X32 = _prepare(X, kernel)
    _resolve_sizes(X.shape[0], None, m)
    _check_delta(delta)
    cands, _, _, _ = _split_with_leftovers(X32, kernel, m, delta, _rng(seed), None, False)
    return cands


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _swap_core(kernel, X32, cands, meanK, size, passes, unique, include_standard=True):
    n = X32.shape[0]
    s_c = cands.shape[1]
    if include_standard:
        step = max(1, n // s_c)
        std = n - 1 - step * np.arange(s_c, dtype=np.int64)
        cands = np.vstack([cands, std[None, ::-1]])
    scores = candidate_scores(kernel, X32[None], cands[None], meanK[None])[0]
    best = cands[int(np.argmin(scores))]
    best = trim(kernel, X32, best, meanK, size)
    return refine(kernel, X32[None], best[None], meanK[None], passes, unique)[0]


@single_thread_blas
def kt_swap(
    X: np.ndarray,
    candidates: np.ndarray,
    kernel: Kernel | str,
    coreset_size: int | None = None,
    passes: int = 3,
    unique: bool = False,
) -> np.ndarray:
    """KT-SWAP: best candidate (or standard thinning) by MMD, then greedy point swaps."""
    X, kernel, X32 = _prepare(X, kernel)
    cands = np.atleast_2d(np.asarray(candidates))
    if cands.size == 0 or not np.issubdtype(cands.dtype, np.integer):
        raise ValueError("candidates must be a non-empty integer array (K, s)")
    if cands.min() < 0 or cands.max() >= X.shape[0]:
        raise ValueError(f"candidates must index rows of X in [0, {X.shape[0]})")
    size = cands.shape[1] if coreset_size is None else coreset_size
    size, _ = _resolve_sizes(X.shape[0], size, None)
    if size > cands.shape[1]:
        raise ValueError(f"coreset_size={size} exceeds the candidate size {cands.shape[1]}")
    meanK = _full_row_means(kernel, X32)
    out = _swap_core(kernel, X32, cands.astype(np.int64), meanK, size, passes, unique)
    return np.sort(out).astype(np.int64)


@single_thread_blas
def kt(
    X: np.ndarray,
    kernel: Kernel | str = "gaussian",
    coreset_size: int | None = None,
    m: int | None = None,
    split: str = "target",
    alpha: float | None = None,
    delta: float = 0.5,
    seed: int | None = None,
    passes: int = 3,
    unique: bool = False,
) -> np.ndarray:
    """Kernel thinning (target, root, power or KT+ split; swap with the target kernel).

    Returns sorted int64 row indices of X (repeats possible unless unique=True).
    coreset_size defaults to round(sqrt(n)) (or floor(n / 2^m) when only m is given);
    m defaults to the largest number of halving rounds with floor(n / 2^m) >= coreset_size.
    split: "target" (k), "root" (k^(1/2)), "power" (k^alpha) or "plus" (k/|k| + k_alpha/|k_alpha|);
    alpha defaults to kernel.default_alpha(d). KT-SWAP repeats its sweep over the coreset up
    to ``passes`` times, stopping early once a sweep changes nothing (a second sweep cut MMD by
    20-40% at n = 2^12..2^14 for about 5% more time).
    """
    X, kernel, X32 = _prepare(X, kernel)
    n, d = X.shape
    size, m = _resolve_sizes(n, coreset_size, m)
    _check_delta(delta)
    split_k = split_kernel_for(kernel, split, d, alpha)
    if size == n:  # the input itself has MMD 0: nothing can beat it
        return np.arange(n, dtype=np.int64)
    rng = _rng(seed)
    same = split_k is kernel
    cands, ids, left, acc = _split_with_leftovers(
        X32, split_k, m, delta, rng, None if same else kernel, True
    )
    if m > 0:
        meanK = _row_means(kernel, X32, ids, left, acc)
    else:
        meanK = _full_row_means(kernel, X32)
    out = _swap_core(kernel, X32, cands, meanK, size, passes, unique)
    return np.sort(out).astype(np.int64)

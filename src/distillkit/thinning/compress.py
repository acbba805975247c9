"""Compress and Compress++ with kernel halving / kernel thinning, for any n.

Compress(S, g): if |S| <= 4^g return S; otherwise split S into 4 contiguous parts whose
sizes differ by at most one, compress each, concatenate and halve. No point is dropped:
goodpoints first truncates n to a power of 4 (up to 3/4 of the data); here the recursion
tree simply has unequal leaves. Nodes of the same level whose concatenated input has the
same length (and which cover the same number of points, hence share a delta) are halved
together in one batched call, so power-of-4 inputs (one length per level) are as fast as
possible and other n add only a few extra batches.

Halving is kernel halving (KT-SPLIT with m = 1) followed by KT-SWAP on the two halves plus
the standard-thinning half, refined with distinct points (unique swaps), and then replaced
by its complement with probability 1/2, as goodpoints' compresspp_kt does. That last coin
makes every halving symmetric, hence unbiased: E[mean of f over the half] = mean of f over
the input, for any f (without swap, either KT-SPLIT child is returned with probability
1/2, which is the same). When L is odd, the last point of the concatenation is not paired
and is kept with probability 1/2, so the output has floor(L/2) or ceil(L/2) points and
every point stays eligible.

Failure probability (union bound, as in the Compress++ paper and goodpoints): a halving
node covering s input points gets delta_c * s / S, S being the sum of s over all halving
nodes, so the halving deltas add up to delta_c. For n = 4^k this is goodpoints'
delta_c * L^2 / (4^(g+1) n beta) for a halving of L = 2^(g+1) sqrt(s) points, beta being
the number of halving levels. Compress alone uses delta_c = delta. Compress++ gives the
final KT (m halving rounds) delta * m / (m + 2^m beta) and Compress the rest, with
beta = S / n (the mean number of halvings a point goes through) and m computed from the
expected Compress output size.

Compress++ splits the input into ``num_bins`` contiguous bins, runs Compress(g) on each,
concatenates, and thins the result to ``coreset_size`` with target KT (whose trim step
gives the exact size). Bins are independent: each has its own seed (spawned from
``seed``) and is read, centred and converted to float32 on its own, so a memory-mapped
input is streamed bin by bin, bins can run in worker processes or as Dask tasks
(distributed.py), and the coreset does not depend on where they ran.

Halvings whose L x L kernel matrices fit ``halving.STORE`` elements (per batch of groups)
compute each matrix once in float32 and read the split, the row means and KT-SWAP from
it (halving.py); larger ones evaluate split tiles and float64 swap rows on the fly.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing as mp
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np

from .halving import STORE, halve_stored, kernel_matrices, paired_b2, stored_sums, thresholds
from .kernels import Kernel, check_points
from .kt import (
    _check_delta,
    _halve_batch,
    _prepare,
    _resolve_sizes,
    _rng,
    kt,
    single_thread_blas,
)
from .mmd import resolve_kernel
from .swap import refine

__all__ = ["compress", "compresspp"]


def _check_g(g) -> int:
    if isinstance(g, bool) or int(g) != g or g < 0:
        raise ValueError(f"g must be a non-negative integer, got {g!r}")
    return int(g)


def _symmetrise(keep: np.ndarray, L: int, rng: np.random.Generator) -> np.ndarray:
    """The kept half or its complement, each with probability 1/2 (unbiased halving).

    Without this the MMD-driven choice biases every halving towards a fixed side.
    """
    G, h = keep.shape
    flip = rng.random(G) < 0.5
    if flip.any():
        mask = np.zeros((G, L), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        comp = np.nonzero(~mask)[1].reshape(G, h)  # row-major: row g's L/2 positions
        keep = np.where(flip[:, None], comp, keep)
    return keep


def _swap_halve_stored(
    kernel: Kernel, Xg: np.ndarray, log_mult: float, rng: np.random.Generator, store: list
) -> np.ndarray:
    """Kernel halving + KT-SWAP of G groups (G, L, d) on stored matrices -> (G, L/2) local.

    store holds one float32 buffer reused by every batch: a fresh 256 MB matrix array
    page-faulted on first touch (3x the kernel time at L = 1024).
    """
    need = Xg.shape[0] * Xg.shape[1] ** 2
    if not store or store[0].size < need:
        store[:] = [np.empty(need, dtype=np.float32)]
    K = kernel_matrices(kernel, Xg, store[0])
    G, L, _ = K.shape
    h = L // 2
    A = thresholds(paired_b2(K), log_mult)
    pos = halve_stored(K, A, rng.random((G, h)))
    w = np.zeros((G, L))
    np.put_along_axis(w, pos[:, 0], 1.0, axis=1)
    np.put_along_axis(w, pos[:, 1], -1.0, axis=1)
    rows, Kw, sks = stored_sums(K, w)
    meanK = rows / L
    # K @ child 0 and K @ child 1 (the two KT-SPLIT children partition the group)
    Kc = np.stack([0.5 * (rows + Kw), 0.5 * (rows - Kw)], axis=1)
    # MMD^2 of each candidate up to a constant: v'Kv / h^2 - 2 mean of meanK over it
    vkv = np.concatenate([np.take_along_axis(Kc, pos, axis=2).sum(axis=2), sks[:, None]], 1)
    std = np.broadcast_to(np.arange(1, L, 2), (G, h))
    cands = np.concatenate([pos, std[:, None, :]], axis=1)  # (G, 3, L/2)
    mk = np.take_along_axis(meanK[:, None, :], cands, axis=2).mean(axis=2)
    pick = (vkv / h**2 - 2.0 * mk).argmin(axis=1)
    gi = np.arange(G)
    best = cands[gi, pick]
    ksum = Kc[gi, np.minimum(pick, 1)]
    for g in np.nonzero(pick == 2)[0]:  # standard thinning won (rare): its sums on demand
        ksum[g] = K[g][:, 1::2].sum(axis=1, dtype=np.float64)
    keep = refine(kernel, Xg, best, meanK, 1, True, K=K, ksum=ksum)
    return _symmetrise(keep, L, rng)


def _halve_groups(
    kernel: Kernel,
    X32: np.ndarray,
    groups: np.ndarray,
    delta: float,
    rng: np.random.Generator,
    swap: bool,
    store: list | None = None,
) -> np.ndarray:
    """Halve G equal-length (even L) groups of row ids at once -> (G, L/2) row ids.

    delta is the failure probability parameter of each group's halving; store is the
    reusable matrix buffer of _swap_halve_stored (dropped once the groups outgrow it).
    """
    store = [] if store is None else store
    G, L = groups.shape
    Xg = X32[groups]
    acc = np.zeros((G, L)) if swap and L * L > STORE else None
    log_mult = 2.0 * math.log(2.0 * L / delta)
    if not swap:
        pos = _halve_batch(Xg, kernel, log_mult, rng)  # (G, 2, L/2)
        # symmetrised halving: either child with probability 1/2
        pick = rng.integers(0, 2, size=G)
        keep = pos[np.arange(G), pick]
    elif L * L <= STORE:
        per = max(1, STORE // (L * L))
        keep = np.concatenate(
            [
                _swap_halve_stored(kernel, Xg[g : g + per], log_mult, rng, store)
                for g in range(0, G, per)
            ]
        )
    else:
        store.clear()  # larger groups evaluate on the fly: free the stored-matrix buffer
        pos, ksums = _halve_batch(Xg, kernel, log_mult, rng, None, acc, sums=True)
        meanK = acc / L
        h = L // 2
        std = np.broadcast_to(np.arange(1, L, 2), (G, h))
        cands = np.concatenate([pos, std[:, None, :]], axis=1)  # (G, 3, L/2)
        # MMD^2 up to a constant, with the candidates' kernel sums taken from the split
        mk = np.take_along_axis(meanK[:, None, :], cands, axis=2).mean(axis=2)
        scores = ksums / h**2 - 2.0 * mk
        best = cands[np.arange(G), scores.argmin(axis=1)]
        keep = _symmetrise(refine(kernel, Xg, best, meanK, passes=1, unique=True), L, rng)
    return np.take_along_axis(groups, keep, axis=1)


def _children(start: int, size: int) -> list[tuple[int, int]]:
    base, extra = divmod(size, 4)
    out, s = [], start
    for i in range(4):
        sz = base + (1 if i < extra else 0)
        out.append((s, sz))
        s += sz
    return out


def _tree(roots: list[tuple[int, int]], g: int) -> tuple[list, dict, int]:
    """Compress(g) recursion trees of the ranges, breadth first.

    Returns the nodes (start, size, depth, parent), the children of each node, and the
    halving load S: the sum of the sizes of all nodes that halve (size > 4^g).
    """
    leaf = 4**g
    nodes: list[tuple[int, int, int, int]] = []
    kids: dict[int, list[int]] = defaultdict(list)
    frontier = [(s, z, 0, -1) for s, z in roots]
    load = 0
    while frontier:
        nxt = []
        for node in frontier:
            nid = len(nodes)
            nodes.append(node)
            if node[3] >= 0:
                kids[node[3]].append(nid)
            start, size, depth, _ = node
            if size > leaf:
                load += size
                nxt.extend((s, z, depth + 1, nid) for s, z in _children(start, size) if z > 0)
        frontier = nxt
    return nodes, kids, load


def _plan(roots: list[tuple[int, int]], g: int) -> tuple[int, float]:
    """Halving load S (as in _tree) and expected Compress(g) output size of the ranges.

    Each halving keeps L/2 points in expectation (odd L: the unpaired point half the time).
    Node sizes repeat (at most two per depth), so results are cached by size.
    """
    leaf = 4**g
    cache: dict[int, tuple[int, float]] = {}

    def visit(size: int) -> tuple[int, float]:
        if size <= leaf:
            return 0, float(size)
        if size not in cache:
            sub = [visit(z) for _, z in _children(0, size) if z > 0]
            cache[size] = (size + sum(a for a, _ in sub), 0.5 * sum(b for _, b in sub))
        return cache[size]

    res = [visit(z) for _, z in roots]
    return sum(a for a, _ in res), sum(b for _, b in res)


def _compress_ranges(
    kernel: Kernel,
    X32: np.ndarray,
    roots: list[tuple[int, int]],
    g: int,
    delta: float,
    rng: np.random.Generator,
    swap: bool,
    load: int | None = None,
    store: list | None = None,
) -> list[np.ndarray]:
    """Compress(g) of each contiguous range (start, size); returns one index array per root.

    delta is shared by all halvings of all ranges: a node covering s points gets
    delta * s / S (S from _tree, or ``load`` when the ranges are part of a larger input),
    so the halving failure probabilities add up to delta. store: the stored-matrix buffer
    (see _swap_halve_stored), shared with the caller's other ranges when given.
    """
    leaf = 4**g
    nodes, kids, own = _tree(roots, g)
    load = own if load is None else load
    out: dict[int, np.ndarray] = {}
    store = [] if store is None else store
    max_depth = max(nd[2] for nd in nodes)
    for depth in range(max_depth, -1, -1):
        # (input length, node size) -> node ids; equal sizes share the node's delta
        todo = defaultdict(list)
        inputs: dict[int, np.ndarray] = {}
        for nid, (start, size, dep, _) in enumerate(nodes):
            if dep != depth:
                continue
            if size <= leaf:
                out[nid] = np.arange(start, start + size, dtype=np.int64)
                continue
            inp = np.concatenate([out.pop(c) for c in kids[nid]])
            inputs[nid] = inp
            todo[(inp.size, size)].append(nid)
        for L, size in sorted(todo):
            ids = todo[(L, size)]
            batch = np.stack([inputs[i] for i in ids])
            odd = L % 2 == 1
            pairs = batch[:, : L - 1] if odd else batch
            if pairs.shape[1] >= 2:
                halves = _halve_groups(kernel, X32, pairs, delta * size / load, rng, swap, store)
            else:
                halves = pairs[:, :0]
            coin = rng.random(len(ids)) < 0.5 if odd else None
            for r, nid in enumerate(ids):
                h = halves[r]
                if odd and coin[r]:
                    h = np.append(h, batch[r, -1])
                out[nid] = h
    return [out[i] for i in range(len(roots))]


@single_thread_blas
def compress(
    X: np.ndarray,
    kernel: Kernel | str = "gaussian",
    g: int = 4,
    seed: int | None = None,
    delta: float = 0.5,
    swap: bool = True,
) -> np.ndarray:
    """Compress(g) with KT halving: about 2^g sqrt(n) int64 indices, any n.

    delta is shared by all halvings (their failure probability parameters add up to it).
    """
    X, kernel, X32 = _prepare(X, kernel)
    g = _check_g(g)
    _check_delta(delta)
    out = _compress_ranges(kernel, X32, [(0, X.shape[0])], g, delta, _rng(seed), swap)[0]
    return np.sort(out)


_ROWS = 1 << 16  # rows per chunk when streaming through the input


def _stream_points(X) -> np.ndarray:
    """Validate X without copying a 2-D float array (a memory map stays on disk)."""
    if not (isinstance(X, np.ndarray) and X.ndim == 2 and X.size and X.dtype.kind in "fiu"):
        return check_points(X)
    for i in range(0, X.shape[0], _ROWS):
        if not np.all(np.isfinite(X[i : i + _ROWS])):
            raise ValueError("X contains NaN or inf")
    return X


def _release(X: np.ndarray) -> None:
    """Drop the pages of a memory-mapped X from this process (they stay in the page cache).

    Reading a bin maps its pages into the process; without this a full pass over a large
    input would count all of it as resident memory (and be inherited by forked workers).
    """
    mm = getattr(X, "_mmap", None) if isinstance(X, np.memmap) else None
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # not fatal: only the resident size is affected
            pass


def _column_mean(X: np.ndarray) -> np.ndarray:
    total = np.zeros(X.shape[1])
    for i in range(0, X.shape[0], _ROWS):
        total += X[i : i + _ROWS].sum(axis=0, dtype=np.float64)
    return total / X.shape[0]


def _bin_points(X: np.ndarray, start: int, size: int, mean: np.ndarray) -> np.ndarray:
    """Rows start..start+size of X, centred by mean, as float32 (read chunk by chunk)."""
    out = np.empty((size, X.shape[1]), dtype=np.float32)
    for i in range(0, size, _ROWS):
        j = min(size, i + _ROWS)
        out[i:j] = np.asarray(X[start + i : start + j], dtype=np.float64) - mean
    return out


def compress_bin(
    kernel: Kernel,
    X: np.ndarray,
    start: int,
    size: int,
    mean: np.ndarray,
    g: int,
    delta: float,
    load: int,
    seed: np.random.SeedSequence,
    swap: bool = True,
    store: list | None = None,
) -> np.ndarray:
    """Compress(g) of the bin X[start:start+size]: sorted global row indices.

    Only this bin is held in memory (float32); delta * s / load goes to a halving node
    covering s points. The bin's own seed makes the result independent of where and in
    which order the bins run. store: a matrix buffer reused across bins (a fresh 256 MB
    buffer per bin is page-faulted anew on first touch).
    """
    X32 = _bin_points(X, start, size, mean)
    _release(X)
    rng = np.random.default_rng(seed)
    out = _compress_ranges(kernel, X32, [(0, size)], g, delta, rng, swap, load, store)[0]
    return np.sort(out) + start


def compresspp_plan(
    n: int, g: int, size: int, delta: float, num_bins: int
) -> tuple[list[tuple[int, int]] | None, int, int, float, float]:
    """Bins, grown g, halving load and the delta split of Compress++ on n points.

    Returns (roots, g, load, delta_compress, delta_kt); roots is None when Compress would
    keep every point, so that KT on the whole input is the answer.
    """
    num_bins = int(min(num_bins, n))
    # grow g until Compress keeps enough points (each bin yields about 2^g sqrt(n / bins))
    while 2**g * math.sqrt(n / num_bins) * num_bins < 2 * size and 4**g < n:
        g += 1
    if 4**g * num_bins >= n:
        return None, g, 0, 0.0, delta
    base, extra = divmod(n, num_bins)
    roots, s = [], 0
    for i in range(num_bins):
        z = base + (1 if i < extra else 0)
        roots.append((s, z))
        s += z
    # split delta between Compress and the final KT (goodpoints' compresspp_kt); m is
    # fixed before Compress runs, from its expected output size, so the split is not
    # random; m >= 1 keeps the KT share positive
    load, expected = _plan(roots, g)
    beta = load / n
    _, m = _resolve_sizes(max(size, int(round(expected))), size, None)
    m = max(m, 1)
    delta_kt = delta * m / (m + 2**m * beta)
    return roots, g, load, delta - delta_kt, delta_kt


@single_thread_blas
def compresspp(
    X: np.ndarray,
    kernel: Kernel | str = "gaussian",
    g: int = 4,
    coreset_size: int | None = None,
    seed: int | None = None,
    delta: float = 0.5,
    num_bins: int = 4,
    swap: bool = True,
    unique: bool = False,
    workers: int = 1,
) -> np.ndarray:
    """Compress++: Compress(g) on num_bins bins, then target KT down to coreset_size.

    unique=True makes the final KT-SWAP keep the indices distinct. delta is split between
    the Compress halvings and the final KT as described in the module docstring. The
    bins are streamed: a memory-mapped X is read one bin at a time and never copied
    whole, and no all-pairs array is formed. workers > 1 compresses bins in that many
    forked processes (same result as workers=1).
    """
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    X, kernel, done, setup = start_compresspp(
        X, kernel, g, coreset_size, seed, delta, num_bins, unique
    )
    if done is not None:
        return done
    tasks = [(kernel, X, a, z, *args, swap) for (a, z), args in zip(setup.roots, setup.bin_args)]
    parts = _run_bins(tasks, workers)
    return finish_compresspp(X, kernel, parts, setup.size, setup.delta_kt, setup.seed_kt, unique)


class CompressppSetup(NamedTuple):
    """What every bin of one Compress++ call shares, and what its final KT needs."""

    roots: list[tuple[int, int]]
    bin_args: list[tuple]  # per bin: (mean, g, delta, load, seed), compress_bin's middle args
    size: int
    delta_kt: float
    seed_kt: np.random.SeedSequence


def start_compresspp(
    X: np.ndarray,
    kernel: Kernel | str,
    g: int,
    coreset_size: int | None,
    seed: int | None,
    delta: float,
    num_bins: int,
    unique: bool,
) -> tuple[np.ndarray, Kernel, np.ndarray | None, CompressppSetup | None]:
    """Checks, bins and seeds of Compress++, shared by every way of running its bins.

    Returns (X, kernel, indices, None) when Compress would keep every point (plain KT is then
    the answer), else (X, kernel, None, setup).
    """
    X = _stream_points(X)
    kernel = resolve_kernel(kernel, X)
    n = X.shape[0]
    g = _check_g(g)
    _check_delta(delta)
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    size, _ = _resolve_sizes(n, coreset_size, None)
    seeds = np.random.SeedSequence(seed).spawn(2)
    roots, g, load, delta_c, delta_kt = compresspp_plan(n, g, size, delta, num_bins)
    if roots is None:  # Compress would return its input: thin directly
        idx = kt(X, kernel, coreset_size=size, delta=delta, seed=seeds[1], unique=unique)
        return X, kernel, idx, None
    mean = _column_mean(X)
    _release(X)
    bin_args = [(mean, g, delta_c, load, s) for s in seeds[0].spawn(len(roots))]
    return X, kernel, None, CompressppSetup(roots, bin_args, size, delta_kt, seeds[1])


_TASKS: list = []  # bin arguments inherited by forked workers (X is never pickled)
_WORKER_STORE: list = []  # a forked worker's matrix buffer, kept across its bins


def _bin_task(i: int) -> np.ndarray:
    return compress_bin(*_TASKS[i], store=_WORKER_STORE)


def _run_bins(tasks: list, workers: int) -> list[np.ndarray]:
    """compress_bin on every task, in forked worker processes when workers > 1.

    Each bin has its own seed, so the result does not depend on workers.
    """
    workers = min(int(workers), len(tasks))
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        store: list = []  # one matrix buffer for all bins
        return [compress_bin(*t, store=store) for t in tasks]
    _TASKS[:] = tasks
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            return list(ex.map(_bin_task, range(len(tasks))))
    finally:
        _TASKS.clear()


def finish_compresspp(
    X: np.ndarray,
    kernel: Kernel,
    parts: list[np.ndarray],
    size: int,
    delta_kt: float,
    seed: np.random.SeedSequence,
    unique: bool,
) -> np.ndarray:
    """Final KT of Compress++ on the concatenated bin outputs -> sorted int64 indices."""
    inter = np.sort(np.concatenate(parts))
    if inter.size < size:  # cannot happen with the g adjustment, kept as a guard
        inter = np.arange(X.shape[0])
    sub = kt(
        np.asarray(X[inter]), kernel, coreset_size=size, delta=delta_kt, seed=seed, unique=unique
    )
    return np.sort(inter[sub]).astype(np.int64)

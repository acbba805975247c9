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
gives the exact size).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .kernels import Kernel
from .kt import (
    _check_delta,
    _halve_batch,
    _prepare,
    _refine,
    _resolve_sizes,
    _rng,
    kt,
    single_thread_blas,
)

__all__ = ["compress", "compresspp"]


def _check_g(g) -> int:
    if isinstance(g, bool) or int(g) != g or g < 0:
        raise ValueError(f"g must be a non-negative integer, got {g!r}")
    return int(g)


def _halve_groups(
    kernel: Kernel,
    X32: np.ndarray,
    groups: np.ndarray,
    delta: float,
    rng: np.random.Generator,
    swap: bool,
) -> np.ndarray:
    """Halve G equal-length (even L) groups of row ids at once -> (G, L/2) row ids.

    delta is the failure probability parameter of each group's halving.
    """
    G, L = groups.shape
    Xg = X32[groups]
    acc = np.zeros((G, L)) if swap else None
    log_mult = 2.0 * math.log(2.0 * L / delta)
    if not swap:
        pos = _halve_batch(Xg, kernel, log_mult, rng)  # (G, 2, L/2)
        # symmetrised halving: either child with probability 1/2
        pick = rng.integers(0, 2, size=G)
        keep = pos[np.arange(G), pick]
    else:
        pos, ksums = _halve_batch(Xg, kernel, log_mult, rng, None, acc, sums=True)
        meanK = acc / L
        h = L // 2
        std = np.broadcast_to(np.arange(1, L, 2), (G, h))
        cands = np.concatenate([pos, std[:, None, :]], axis=1)  # (G, 3, L/2)
        # MMD^2 up to a constant, with the candidates' kernel sums taken from the split
        mk = np.take_along_axis(meanK[:, None, :], cands, axis=2).mean(axis=2)
        scores = ksums / h**2 - 2.0 * mk
        best = cands[np.arange(G), scores.argmin(axis=1)]
        keep = _refine(kernel, Xg, best, meanK, passes=1, unique=True)
        # symmetrise: the refined half or its complement, each with probability 1/2;
        # without this the MMD-driven choice biases every halving towards a fixed side
        flip = rng.random(G) < 0.5
        if flip.any():
            mask = np.zeros((G, L), dtype=bool)
            np.put_along_axis(mask, keep, True, axis=1)
            comp = np.nonzero(~mask)[1].reshape(G, h)  # row-major: row g's L/2 positions
            keep = np.where(flip[:, None], comp, keep)
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
) -> list[np.ndarray]:
    """Compress(g) of each contiguous range (start, size); returns one index array per root.

    delta is shared by all halvings of all ranges: a node covering s points gets
    delta * s / S (S from _tree), so the halving failure probabilities add up to delta.
    """
    leaf = 4**g
    nodes, kids, load = _tree(roots, g)
    out: dict[int, np.ndarray] = {}
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
                halves = _halve_groups(kernel, X32, pairs, delta * size / load, rng, swap)
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
) -> np.ndarray:
    """Compress++: Compress(g) on num_bins bins, then target KT down to coreset_size.

    unique=True makes the final KT-SWAP keep the indices distinct. delta is split between
    the Compress halvings and the final KT as described in the module docstring.
    """
    X, kernel, X32 = _prepare(X, kernel)
    n = X.shape[0]
    g = _check_g(g)
    _check_delta(delta)
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    size, _ = _resolve_sizes(n, coreset_size, None)
    seeds = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(seeds[0])
    num_bins = int(min(num_bins, n))
    # grow g until Compress keeps enough points (each bin yields about 2^g sqrt(n / bins))
    while 2**g * math.sqrt(n / num_bins) * num_bins < 2 * size and 4**g < n:
        g += 1
    if 4**g * num_bins >= n:
        # Compress would return its input: thin directly
        return kt(X, kernel, coreset_size=size, delta=delta, seed=seeds[1], unique=unique)
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
    parts = _compress_ranges(kernel, X32, roots, g, delta - delta_kt, rng, swap)
    inter = np.sort(np.concatenate(parts))
    if inter.size < size:  # cannot happen with the g adjustment above, kept as a guard
        inter = np.arange(n)
    sub = kt(X[inter], kernel, coreset_size=size, delta=delta_kt, seed=seeds[1], unique=unique)
    return np.sort(inter[sub]).astype(np.int64)

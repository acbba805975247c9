"""Pick training subsets by kernel thinning or at random (numpy only, no torch).

Rows are distinct (KT-SWAP runs with unique=True). Exact sizes: ``kt`` trims its best halving candidate to the requested size by greedy
MMD-optimal removal before KT-SWAP, so any size works (not only n / 2^m). Classes with
more than ``KT_MAX_N`` rows use Compress++ (same exact-size thinning at the end), which
keeps the cost near-linear in n.
"""

from __future__ import annotations

import numpy as np

from distillkit.thinning import compresspp, get_kernel, kt
from distillkit.thinning.kernels import Kernel, check_points

__all__ = ["select", "select_fraction", "allocate", "METHODS", "KT_MAX_N"]

METHODS = ("kt", "random", "full")
KT_MAX_N = 1 << 14  # above this, plain KT's O(n^2) kernel work is replaced by Compress++


def allocate(counts: np.ndarray, size: int) -> np.ndarray:
    """Split size across groups proportionally to counts (largest remainder, exact total)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not 0 <= size <= total:
        raise ValueError(f"size must be in [0, {total}], got {size}")
    quota = counts * (size / total)
    base = np.floor(quota).astype(np.int64)
    rest = size - int(base.sum())
    if rest:
        # ties go to the larger class, then the lower label, so results are deterministic
        order = np.lexsort((np.arange(counts.size), -counts, -(quota - base)))
        base[order[:rest]] += 1
    return np.minimum(base, counts)


def _thin_rows(X: np.ndarray, size: int, kernel: Kernel, seed: int) -> np.ndarray:
    n = X.shape[0]
    if size >= n:
        return np.arange(n, dtype=np.int64)
    if n > KT_MAX_N:
        return compresspp(X, kernel, coreset_size=size, seed=seed, unique=True)
    # unique swaps: a training subset must not repeat rows
    return kt(X, kernel, coreset_size=size, seed=seed, unique=True)


def select(
    features: np.ndarray,
    size: int,
    method: str = "kt",
    labels: np.ndarray | None = None,
    per_class: bool = True,
    seed: int = 0,
    kernel: str | Kernel = "gaussian",
    bandwidth: float | str = "median",
) -> np.ndarray:
    """Sorted int64 row indices of a size-row subset chosen by KT, at random, or all rows."""
    X = check_points(features, "features")
    n = X.shape[0]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
    if method == "full":
        return np.arange(n, dtype=np.int64)
    if isinstance(size, bool) or int(size) != size or not 1 <= size <= n:
        raise ValueError(f"size must be an integer in [1, {n}], got {size!r}")
    size = int(size)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if method == "kt":
        kern = kernel if isinstance(kernel, Kernel) else get_kernel(kernel, bandwidth=bandwidth)
        # one bandwidth for all classes so per-class coresets use the same geometry
        kern = kern.fit(X)
    rng = np.random.default_rng(seed)
    if labels is None or not per_class:
        groups = [np.arange(n)]
        sizes = [size]
    else:
        classes, inv = np.unique(labels, return_inverse=True)
        groups = [np.nonzero(inv == c)[0] for c in range(classes.size)]
        sizes = allocate(np.array([g.size for g in groups]), size)
    out = []
    for i, (rows, k) in enumerate(zip(groups, sizes)):
        if k == 0:
            continue
        if method == "random":
            out.append(rng.choice(rows, int(k), replace=False))
        else:
            out.append(rows[_thin_rows(X[rows], int(k), kern, seed + i)])
    return np.sort(np.concatenate(out)).astype(np.int64)


def select_fraction(
    features: np.ndarray,
    fraction: float,
    labels: np.ndarray | None = None,
    **kwargs,
) -> np.ndarray:
    """select() with size = round(fraction * n) (at least 1)."""
    n = check_points(features, "features").shape[0]
    if not (0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return select(features, max(1, int(round(fraction * n))), labels=labels, **kwargs)

"""Maximum mean discrepancy, computed blockwise so memory stays O(block * n)."""

from __future__ import annotations

import numpy as np

from .kernels import Gaussian, Kernel, check_points, get_kernel, single_thread_blas

__all__ = ["mmd", "mmd_to_gaussian", "kernel_row_means", "resolve_kernel", "integration_error"]

_BLOCK_ELEMS = 1 << 22  # about 32 MB of float64 per kernel block


def resolve_kernel(kernel: Kernel | str, X: np.ndarray) -> Kernel:
    """Kernel object with a numeric bandwidth (names get the median heuristic on X)."""
    if isinstance(kernel, str):
        kernel = get_kernel(kernel, bandwidth="median")
    if not isinstance(kernel, Kernel):
        raise ValueError(f"kernel must be a Kernel or a kernel name, got {type(kernel).__name__}")
    return kernel.fit(X)


def _rows_per_block(m: int) -> int:
    return max(1, _BLOCK_ELEMS // max(1, m))


def _weighted_sum(
    kernel: Kernel,
    A: np.ndarray,
    B: np.ndarray,
    wa: np.ndarray,
    wb: np.ndarray,
    dtype=np.float64,
) -> float:
    """sum_ij wa_i wb_j k(A_i, B_j) without materialising the full matrix."""
    total = 0.0
    step = _rows_per_block(B.shape[0])
    for i in range(0, A.shape[0], step):
        K = kernel(A[i : i + step], B, dtype=dtype)
        total += float(wa[i : i + step] @ (K @ wb.astype(K.dtype, copy=False)))
    return total


def kernel_row_means(
    X: np.ndarray, kernel: Kernel, Y: np.ndarray | None = None, dtype=np.float64
) -> np.ndarray:
    """mean_j k(X_i, Y_j) for every row i (Y defaults to X), blockwise."""
    Y = X if Y is None else Y
    out = np.empty(X.shape[0])
    step = _rows_per_block(Y.shape[0])
    for i in range(0, X.shape[0], step):
        out[i : i + step] = kernel(X[i : i + step], Y, dtype=dtype).mean(axis=1, dtype=np.float64)
    return out


def _norm_weights(w: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)):
        raise ValueError(f"{name} must be a finite vector of length {n}")
    s = w.sum()
    if s == 0:
        raise ValueError(f"{name} must not sum to zero")
    return w / s


def _check_indices(indices: np.ndarray, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError("indices must be a non-empty 1-D array")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError("indices must be integers")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices must lie in [0, {n})")
    return idx.astype(np.int64)


@single_thread_blas
def mmd(
    X: np.ndarray,
    kernel: Kernel | str,
    indices: np.ndarray | None = None,
    Y: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> float:
    """Exact MMD between the empirical distribution of X and X[indices] (or Y), blockwise.

    ``weights`` weights the coreset points (X[indices] or Y); X is always uniform.
    """
    X = check_points(X)
    kernel = resolve_kernel(kernel, X)
    if (indices is None) == (Y is None):
        raise ValueError("pass exactly one of indices or Y")
    if indices is not None:
        Y = X[_check_indices(indices, X.shape[0])]
    else:
        Y = check_points(Y, "Y")
        if Y.shape[1] != X.shape[1]:
            raise ValueError(f"Y must have {X.shape[1]} columns, got {Y.shape[1]}")
    wx = np.full(X.shape[0], 1.0 / X.shape[0])
    wy = _norm_weights(weights, Y.shape[0], "weights")
    shift = X.mean(axis=0)  # centring reduces cancellation in |x|^2 + |y|^2 - 2 x.y
    Xc, Yc = X - shift, Y - shift
    xx = _weighted_sum(kernel, Xc, Xc, wx, wx)
    xy = _weighted_sum(kernel, Yc, Xc, wy, wx)
    yy = _weighted_sum(kernel, Yc, Yc, wy, wy)
    return float(np.sqrt(max(xx - 2.0 * xy + yy, 0.0)))


@single_thread_blas
def mmd_to_gaussian(
    X: np.ndarray,
    sigma: float,
    indices: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> float:
    """Closed-form MMD between X[indices] (or X) and N(0, I_d) for the Gaussian kernel."""
    X = check_points(X)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive, got {sigma}")
    if indices is not None:
        X = X[_check_indices(indices, X.shape[0])]
    d = X.shape[1]
    w = _norm_weights(weights, X.shape[0], "weights")
    s2 = float(sigma) ** 2
    yy = _weighted_sum(Gaussian(float(sigma)), X, X, w, w)
    # E_Z k(x, Z) and E_{Z,Z'} k(Z, Z') for Z, Z' ~ N(0, I_d) independent
    ez = (s2 / (s2 + 1.0)) ** (d / 2.0) * np.exp(-np.sum(X * X, axis=1) / (2.0 * (s2 + 1.0)))
    ezz = (s2 / (s2 + 2.0)) ** (d / 2.0)
    return float(np.sqrt(max(yy - 2.0 * float(w @ ez) + ezz, 0.0)))


def integration_error(
    X: np.ndarray,
    f,
    indices: np.ndarray,
    weights: np.ndarray | None = None,
    target: float | np.ndarray | None = None,
) -> float | np.ndarray:
    """|coreset average of f - target| (target defaults to the average of f over X).

    f is a callable mapping an (m, d) array to (m,) or (m, k) values, or the values of f at
    every row of X ((n,) or (n, k)). The coreset average uses ``weights`` (normalised)
    or equal weights. Returns a float, or an array of k errors for vector-valued f.
    """
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be a non-empty 2-D array, got shape {X.shape}")
    idx = _check_indices(indices, X.shape[0])
    w = _norm_weights(weights, idx.size, "weights")
    if callable(f):
        sub = np.asarray(f(np.asarray(X[idx], dtype=np.float64)), dtype=np.float64)
        full = None if target is not None else np.asarray(f(check_points(X)), dtype=np.float64)
    else:
        full = np.asarray(f, dtype=np.float64)
        if full.shape[:1] != (X.shape[0],):
            raise ValueError(f"f values must have {X.shape[0]} rows, got shape {full.shape}")
        sub = full[idx]
    if sub.shape[:1] != (idx.size,) or sub.ndim > 2 or not np.all(np.isfinite(sub)):
        raise ValueError("f must give finite values of shape (m,) or (m, k) for m points")
    est = np.tensordot(w, sub, axes=(0, 0))
    ref = full.mean(axis=0) if target is None else np.asarray(target, dtype=np.float64)
    if np.shape(ref) != np.shape(est):
        raise ValueError(f"target must have shape {np.shape(est)}, got {np.shape(ref)}")
    err = np.abs(est - ref)
    return float(err) if err.ndim == 0 else err

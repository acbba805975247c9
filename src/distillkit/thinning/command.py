"""`distillkit thin` subcommand: thin a point set and compare its MMD with an iid subsample."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .compress import compresspp
from .kernels import KERNELS, get_kernel
from .kt import iid, kt
from .mmd import mmd

METHODS = ("kt", "kt+", "compresspp", "iid")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `thin` options on parser."""
    parser.add_argument("input", help="points to thin: .npy (2-D array) or .csv (numeric)")
    parser.add_argument("--size", type=int, default=None, help="coreset size (default sqrt(n))")
    parser.add_argument("--kernel", default="gaussian", choices=sorted(KERNELS))
    parser.add_argument(
        "--bandwidth", default="median", help="kernel bandwidth: a number or 'median'"
    )
    parser.add_argument("--method", default="kt", choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the int64 indices here (.npy)")
    parser.add_argument(
        "--plot", default=None, help="PNG of the coreset over the points (2-D input)"
    )


def _load(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise ValueError(f"input file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            X = np.load(path, allow_pickle=False)
        elif ext == ".csv":
            X = _load_csv(path)
        else:
            raise ValueError(f"input must be a .npy or .csv file, got {path}")
    except (OSError, ValueError) as exc:
        if "input must be" in str(exc):
            raise
        raise ValueError(f"could not read {path}: {exc}") from exc
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    return X


def _load_csv(path: str) -> np.ndarray:
    try:
        return np.loadtxt(path, delimiter=",", ndmin=2)
    except ValueError:
        # tolerate one header line
        return np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)


def _bandwidth(text: str) -> float | str:
    if text == "median":
        return text
    try:
        value = float(text)
    except ValueError as exc:
        raise ValueError(
            f"--bandwidth must be a positive number or 'median', got {text!r}"
        ) from exc
    if not value > 0:
        raise ValueError(f"--bandwidth must be positive, got {text!r}")
    return value


def _plot(path: str, X: np.ndarray, idx: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(X[:, 0], X[:, 1], s=3, c="lightgray", label=f"input (n={len(X)})")
    ax.scatter(X[idx, 0], X[idx, 1], s=14, c="tab:red", label=f"coreset ({len(idx)})")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """Run `distillkit thin`; returns a process exit code."""
    try:
        X = _load(args.input)
        n = X.shape[0]
        size = args.size if args.size is not None else max(1, int(round(np.sqrt(n))))
        kernel = get_kernel(args.kernel, bandwidth=_bandwidth(args.bandwidth))
        if args.plot and X.shape[1] != 2:
            raise ValueError(f"--plot needs 2-D points, input has {X.shape[1]} columns")
        kernel = kernel.fit(X) if np.all(np.isfinite(X)) and X.size else kernel
        t0 = time.perf_counter()
        if args.method == "kt":
            idx = kt(X, kernel, coreset_size=size, seed=args.seed)
        elif args.method == "kt+":
            idx = kt(X, kernel, coreset_size=size, split="plus", seed=args.seed)
        elif args.method == "compresspp":
            idx = compresspp(X, kernel, coreset_size=size, seed=args.seed)
        else:
            idx = iid(X, size, seed=args.seed)
        elapsed = time.perf_counter() - t0
        base = iid(X, size, seed=args.seed + 1)
        m_core = mmd(X, kernel, indices=idx)
        m_iid = mmd(X, kernel, indices=base)
    except ValueError as exc:
        print(f"distillkit thin: error: {exc}", file=sys.stderr)
        return 2
    print(f"input: {args.input} (n={n}, d={X.shape[1]})")
    print(
        f"method: {args.method}, kernel: {args.kernel}, coreset size: {len(idx)}, {elapsed:.3f} s"
    )
    print(f"MMD(coreset)      = {m_core:.6g}")
    print(f"MMD(iid, same size) = {m_iid:.6g}")
    if args.out:
        np.save(args.out, idx.astype(np.int64))
        print(f"indices written to {args.out}")
    if args.plot:
        _plot(args.plot, X, idx, f"{args.method}: MMD {m_core:.3g} vs iid {m_iid:.3g}")
        print(f"plot written to {args.plot}")
    return 0

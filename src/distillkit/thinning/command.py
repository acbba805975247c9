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
    parser.add_argument(
        "--unique",
        action="store_true",
        help="no repeated indices in the coreset (KT-SWAP may otherwise repeat a point)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="compresspp: compress bins in this many processes (same result as 1)",
    )
    parser.add_argument(
        "--dask",
        action="store_true",
        help="compresspp: run the bins as Dask tasks on a local cluster (the dask extra)",
    )
    parser.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="compresspp: run the bins on this Dask scheduler (implies --dask)",
    )
    parser.add_argument("--out", default=None, help="write the int64 indices here (.npy)")
    parser.add_argument(
        "--plot", default=None, help="PNG of the coreset over the points (2-D input)"
    )


def _load(path: str) -> np.ndarray:
    """Points from .npy (memory-mapped, so inputs larger than memory work) or .csv."""
    if not os.path.isfile(path):
        raise ValueError(f"input file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            X = np.load(path, mmap_mode="r", allow_pickle=False)
        elif ext == ".csv":
            X = _load_csv(path)
        else:
            raise ValueError(f"input must be a .npy or .csv file, got {path}")
    except (OSError, ValueError) as exc:
        if "input must be" in str(exc):
            raise
        raise ValueError(f"could not read {path}: {exc}") from exc
    if X.dtype.kind not in "fiu":
        raise ValueError(f"{path} must hold numbers, got dtype {X.dtype}")
    if X.ndim == 1:
        X = X[:, None]
    return X


def _load_csv(path: str) -> np.ndarray:
    try:
        return np.loadtxt(path, delimiter=",", ndmin=2)
    except ValueError:
        # tolerate one header line
        return np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)


EXACT_MMD_MAX = 1 << 15  # larger inputs: MMD against a uniform sample (n^2 is too slow)


def _reference(X: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """Points the reported MMD is measured against: all of X, or a uniform sample."""
    n = X.shape[0]
    if n <= EXACT_MMD_MAX:
        return np.asarray(X), ""
    rows = np.sort(np.random.default_rng(seed + 2).choice(n, EXACT_MMD_MAX, replace=False))
    note = f"  (estimated against {EXACT_MMD_MAX} uniformly sampled input points)"
    return np.asarray(X[rows]), note


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
        n = X.shape[0] if X.ndim else 0
        size = args.size if args.size is not None else max(1, int(round(np.sqrt(n))))
        kernel = get_kernel(args.kernel, bandwidth=_bandwidth(args.bandwidth))
        if X.ndim != 2 or X.size == 0:
            raise ValueError(f"input must be a non-empty 2-D array, got shape {X.shape}")
        if args.plot and X.shape[1] != 2:
            raise ValueError(f"--plot needs 2-D points, input has {X.shape[1]} columns")
        use_dask = args.dask or bool(args.scheduler)
        if use_dask and args.method != "compresspp":
            raise ValueError("--dask and --scheduler need --method compresspp")
        kernel = kernel.fit(X)  # median bandwidth from a subsample; NaN is reported below
        t0 = time.perf_counter()
        if args.method == "kt":
            idx = kt(X, kernel, coreset_size=size, seed=args.seed, unique=args.unique)
        elif args.method == "kt+":
            idx = kt(X, kernel, coreset_size=size, split="plus", seed=args.seed, unique=args.unique)
        elif use_dask:
            from .distributed import compresspp_dask

            idx = compresspp_dask(
                X,
                kernel,
                coreset_size=size,
                seed=args.seed,
                unique=args.unique,
                scheduler=args.scheduler,
            )
        elif args.method == "compresspp":
            idx = compresspp(
                X,
                kernel,
                coreset_size=size,
                seed=args.seed,
                unique=args.unique,
                workers=args.workers,
            )
        else:
            idx = iid(X, size, seed=args.seed)
        elapsed = time.perf_counter() - t0
        base = iid(X, size, seed=args.seed + 1)
        ref, note = _reference(X, args.seed)
        m_core = mmd(ref, kernel, Y=np.asarray(X[idx]))
        m_iid = mmd(ref, kernel, Y=np.asarray(X[base]))
    except ValueError as exc:
        print(f"distillkit thin: error: {exc}", file=sys.stderr)
        return 2
    print(f"input: {args.input} (n={n}, d={X.shape[1]})")
    print(
        f"method: {args.method}, kernel: {args.kernel}, coreset size: {len(idx)}, {elapsed:.3f} s"
    )
    print(f"MMD(coreset)      = {m_core:.6g}{note}")
    print(f"MMD(iid, same size) = {m_iid:.6g}{note}")
    if args.out:
        np.save(args.out, idx.astype(np.int64))
        print(f"indices written to {args.out}")
    if args.plot:
        _plot(args.plot, X, idx, f"{args.method}: MMD {m_core:.3g} vs iid {m_iid:.3g}")
        print(f"plot written to {args.plot}")
    return 0

"""`distillkit thin` subcommand: thin a point set and compare its MMD with an iid subsample.

Inputs: .npy, .csv, or an ArviZ InferenceData netCDF file (.nc, read by thinning.io).
"""

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
    parser.add_argument(
        "input",
        help="points to thin: .npy (2-D array), .csv (numeric) or an ArviZ InferenceData "
        ".nc file (posterior draws, chains x draws as rows)",
    )
    parser.add_argument(
        "--vars",
        default=None,
        metavar="A,B,...",
        help=".nc input: posterior variables to use as columns (default: every numeric one; "
        "vector-valued variables give one column per element)",
    )
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
    parser.add_argument(
        "--out",
        default=None,
        help="write the int64 indices here: .npy, or .npz with the column names too "
        "(and chain/draw of each row for .nc input)",
    )
    parser.add_argument(
        "--plot", default=None, help="PNG of the coreset over the points (2-D input)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing --out or --plot file"
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
            raise ValueError(
                f"input must be a .npy or .csv file or an ArviZ InferenceData .nc file, got {path}"
            )
    except (OSError, ValueError) as exc:
        if "input must be" in str(exc):
            raise
        raise ValueError(f"could not read {path}: {exc}") from exc
    if X.dtype.kind not in "fiu":
        raise ValueError(f"{path} must hold numbers, got dtype {X.dtype}")
    if X.ndim == 1:
        X = X[:, None]
    return X


def _parse_vars(text: str | None) -> list[str] | None:
    """Variable names from --vars, or None for the default selection."""
    if text is None:
        return None
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise ValueError(f"--vars needs at least one variable name, got {text!r}")
    twice = sorted({v for v in names if names.count(v) > 1})
    if twice:
        raise ValueError(f"--vars lists {', '.join(twice)} more than once")
    return names


def _load_named(path: str, vars_text: str | None):
    """(points, column names or None, posterior table or None) for any supported input."""
    from .io import is_netcdf_path

    if is_netcdf_path(path):
        from .io import read_posterior_table

        table = read_posterior_table(path, _parse_vars(vars_text))
        return table.X, table.columns, table
    if vars_text is not None:
        raise ValueError("--vars applies to .nc (ArviZ InferenceData) input only")
    return _load(path), None, None


def _save_indices(path: str, idx: np.ndarray, columns, table) -> None:
    """Indices as .npy, or .npz with the column names (and chain/draw for posterior rows)."""
    idx = idx.astype(np.int64)
    if not path.lower().endswith(".npz"):
        np.save(path, idx)
        return
    extra = {}
    if columns is not None:
        extra["columns"] = np.array(columns, dtype=str)
    if table is not None:
        extra["chain"], extra["draw"] = table.chain_draw(idx)
    np.savez(path, indices=idx, **extra)


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


def _plot(path: str, X: np.ndarray, idx: np.ndarray, title: str, columns=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(X[:, 0], X[:, 1], s=3, c="lightgray", label=f"input (n={len(X)})")
    ax.scatter(X[idx, 0], X[idx, 1], s=14, c="tab:red", label=f"coreset ({len(idx)})")
    ax.set_title(title)
    if columns is not None:
        ax.set_xlabel(columns[0])
        ax.set_ylabel(columns[1])
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """Run `distillkit thin`; returns a process exit code."""
    try:
        for flag, path in (("--out", args.out), ("--plot", args.plot)):
            # checked before any work: an earlier result is never replaced unasked
            if path and os.path.exists(path) and not args.force:
                raise ValueError(f"{flag} {path} already exists; choose another path or --force")
        X, columns, table = _load_named(args.input, args.vars)
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
    if columns is not None:
        print(f"variables: {', '.join(columns)}")
    print(
        f"method: {args.method}, kernel: {args.kernel}, coreset size: {len(idx)}, {elapsed:.3f} s"
    )
    print(f"MMD(coreset)      = {m_core:.6g}{note}")
    print(f"MMD(iid, same size) = {m_iid:.6g}{note}")
    if args.out:
        _save_indices(args.out, idx, columns, table)
        print(f"indices written to {args.out}")
    if args.plot:
        title = f"{args.method}: MMD {m_core:.3g} vs iid {m_iid:.3g}"
        _plot(args.plot, X, idx, title, columns)
        print(f"plot written to {args.plot}")
    return 0

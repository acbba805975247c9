"""Benchmark distillkit.thinning against goodpoints (speed and MMD); not a test.

Usage:
    .venv/bin/python benchmarks/thinning_vs_goodpoints.py [--seeds 10] [--quick]
        [--large-seeds 2] [--out-dir bench_results] [--sections kt,compresspp,rates]

Sections (X ~ N(0, I_d), Gaussian kernel with sigma^2 = 2d, same X / kernel / m for both):
  1. kt vs goodpoints.kt.thin(..., store_K=True), n = 2^12, 2^14, d = 2, 10.
  2. compresspp vs goodpoints.compress.compresspp_kt (g = 4), n = 2^16, 2^18, 2^20, d = 2.
  3. MMD vs n (2^8 .. 2^16) for iid, standard thinning, KT, KT+, Compress++ with log-log
     slopes; the plot is written to --out-dir.
MMD is measured to the standard Gaussian target in closed form (the papers' metric);
section 1 also reports the exact MMD to the input sample. Markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import numpy as np

from distillkit.thinning import (
    Gaussian,
    compresspp,
    iid,
    kt,
    mmd,
    mmd_to_gaussian,
    standard_thin,
)


def _gp_kernel(y: np.ndarray, X: np.ndarray, var: float) -> np.ndarray:
    """Gaussian kernel in goodpoints' calling convention kernel(y, X)."""
    return np.exp(-((X - y) ** 2).sum(-1) / (2.0 * var))


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


SEEDS = {"all": 10, "mid": 4, "large": 1}


def _n_seeds(n: int) -> int:
    """10 seeds up to 2^12, fewer above (set by --mid-seeds / --large-seeds)."""
    if n <= 2**12:
        return SEEDS["all"]
    if n <= 2**16:
        return min(SEEDS["all"], SEEDS["mid"])
    return min(SEEDS["all"], SEEDS["large"])


def _mean_se(v) -> str:
    v = np.asarray(v, dtype=float)
    se = v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0
    return f"{v.mean():.3e} ± {se:.1e}"


def section_kt(quick: bool, dims=(2, 10), exps=(12, 14)) -> str:
    from goodpoints import kt as gkt

    sizes = [2**10] if quick else [2**e for e in exps]
    dims = [2] if quick else list(dims)
    lines = [
        "| n | d | m | seeds | goodpoints time (s) | distillkit time (s) | speed-up | "
        "MMD to P: goodpoints | MMD to P: distillkit | MMD to input: goodpoints | "
        "MMD to input: distillkit | MMD ratio (P) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in dims:
        for n in sizes:
            m = int(np.log2(n)) // 2
            sig2 = 2.0 * d
            kern = Gaussian(np.sqrt(sig2))
            gk = partial(_gp_kernel, var=sig2)
            tg, to, mg, mo, eg, eo = [], [], [], [], [], []
            seeds = _n_seeds(n)
            for s in range(seeds):
                X = np.random.default_rng(1000 + s).standard_normal((n, d))
                ig, t1 = _timed(gkt.thin, X, m, gk, gk, delta=0.5, seed=s, store_K=True)
                io, t2 = _timed(kt, X, kern, m=m, seed=s)
                tg.append(t1)
                to.append(t2)
                mg.append(mmd_to_gaussian(X, np.sqrt(sig2), np.asarray(ig)))
                mo.append(mmd_to_gaussian(X, np.sqrt(sig2), io))
                eg.append(mmd(X, kern, indices=np.asarray(ig)))
                eo.append(mmd(X, kern, indices=io))
            lines.append(
                f"| 2^{int(np.log2(n))} | {d} | {m} | {seeds} | {np.mean(tg):.2f} | "
                f"{np.mean(to):.3f} | {np.mean(tg) / np.mean(to):.1f}x | {_mean_se(mg)} | "
                f"{_mean_se(mo)} | {_mean_se(eg)} | {_mean_se(eo)} | "
                f"{np.mean(mo) / np.mean(mg):.3f} |"
            )
            print("progress:", lines[-1], flush=True)
    return "\n".join(lines)


def section_compresspp(quick: bool, exps=(16, 18, 20)) -> str:
    from goodpoints import compress as gcomp

    sizes = [2**12] if quick else [2**e for e in exps]
    d, g = 2, 4
    sig2 = 2.0 * d
    kern = Gaussian(np.sqrt(sig2))
    lines = [
        "| n | d | g | seeds | goodpoints time (s) | distillkit time (s) | speed-up | "
        "MMD to P: goodpoints | MMD to P: distillkit | MMD ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        ns = _n_seeds(n)
        tg, to, mg, mo = [], [], [], []
        for s in range(ns):
            X = np.random.default_rng(2000 + s).standard_normal((n, d))
            kp = np.array([2.0 * sig2])
            ig, t1 = _timed(gcomp.compresspp_kt, X, b"gaussian", k_params=kp, g=g, seed=s)
            io, t2 = _timed(compresspp, X, kern, g=g, seed=s)
            tg.append(t1)
            to.append(t2)
            mg.append(mmd_to_gaussian(X, np.sqrt(sig2), np.asarray(ig)))
            mo.append(mmd_to_gaussian(X, np.sqrt(sig2), io))
        lines.append(
            f"| 2^{int(np.log2(n))} | {d} | {g} | {ns} | {np.mean(tg):.2f} | {np.mean(to):.2f} | "
            f"{np.mean(tg) / np.mean(to):.1f}x | {_mean_se(mg)} | {_mean_se(mo)} | "
            f"{np.mean(mo) / np.mean(mg):.3f} |"
        )
        print("progress:", lines[-1], flush=True)
    return "\n".join(lines)


def section_rates(quick: bool, out_dir: str, exps=(8, 10, 12, 14, 16)) -> str:
    exps = [8, 10] if quick else list(exps)
    d = 2
    sig = np.sqrt(2.0 * d)
    kern = Gaussian(sig)
    methods = {
        "iid": lambda X, s, n: iid(X, int(np.sqrt(n)), seed=s),
        "standard": lambda X, s, n: standard_thin(X, int(np.sqrt(n))),
        "KT": lambda X, s, n: kt(X, kern, seed=s),
        "KT+": lambda X, s, n: kt(X, kern, split="plus", seed=s),
        "Compress++": lambda X, s, n: compresspp(X, kern, g=4, seed=s),
    }
    res = {k: [] for k in methods}
    for e in exps:
        n = 2**e
        vals = {k: [] for k in methods}
        seeds = _n_seeds(n)
        for s in range(seeds):
            X = np.random.default_rng(3000 + s).standard_normal((n, d))
            for name, fn in methods.items():
                vals[name].append(mmd_to_gaussian(X, sig, fn(X, s, n)))
        for k in methods:
            res[k].append(float(np.mean(vals[k])))
        print(f"rates n=2^{e} done ({seeds} seeds)", flush=True)
    ns = np.array([2.0**e for e in exps])
    head = "| method | " + " | ".join(f"n=2^{e}" for e in exps) + " | log-log slope |"
    lines = [head, "|---" * (len(exps) + 2) + "|"]
    slopes = {}
    for k in methods:
        slopes[k] = float(np.polyfit(np.log(ns), np.log(res[k]), 1)[0])
        lines.append(f"| {k} | " + " | ".join(f"{v:.2e}" for v in res[k]) + f" | {slopes[k]:.3f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(out_dir, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in methods:
            ax.loglog(ns, res[k], "o-", label=f"{k} (slope {slopes[k]:.2f})")
        ax.set_xlabel("input size n")
        ax.set_ylabel("MMD to N(0, I_2), coreset size sqrt(n)")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "mmd_vs_n.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        lines.append(f"\nplot: {path}")
    except Exception as exc:  # the table is the result; a plot failure must not lose it
        lines.append(f"\nplot failed: {exc}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def main() -> None:
    """Run the selected benchmark sections and print markdown tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--mid-seeds", type=int, default=4, help="seeds for 2^12 < n <= 2^16")
    p.add_argument("--large-seeds", type=int, default=1, help="seeds for n > 2^16")
    p.add_argument("--quick", action="store_true", help="tiny sizes, smoke run")
    p.add_argument("--out-dir", default="bench_results")
    p.add_argument("--sections", default="kt,compresspp,rates")
    p.add_argument("--kt-dims", default="2,10", help="section 1 dimensions")
    p.add_argument("--kt-exps", default="12,14", help="section 1 sizes as powers of 2")
    p.add_argument("--cpp-exps", default="16,18,20", help="section 2 sizes as powers of 2")
    p.add_argument("--rate-exps", default="8,10,12,14,16", help="section 3 sizes as powers of 2")
    a = p.parse_args()
    secs = a.sections.split(",")
    SEEDS.update(all=a.seeds, mid=a.mid_seeds, large=a.large_seeds)
    print(f"seeds: {SEEDS} (n <= 2^12 / 2^12 < n <= 2^16 / n > 2^16), quick={a.quick}\n")
    if "kt" in secs:
        print("## kt vs goodpoints.kt.thin(store_K=True)\n")
        print(section_kt(a.quick, _ints(a.kt_dims), _ints(a.kt_exps)) + "\n")
    if "compresspp" in secs:
        print("## compresspp vs goodpoints.compress.compresspp_kt (g=4)\n")
        print(section_compresspp(a.quick, _ints(a.cpp_exps)) + "\n")
    if "rates" in secs:
        print("## MMD to N(0, I_2) vs n (mean over seeds)\n")
        print(section_rates(a.quick, a.out_dir, _ints(a.rate_exps)) + "\n")


if __name__ == "__main__":
    main()

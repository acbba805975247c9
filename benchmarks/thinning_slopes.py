"""MMD decay of KT variants with the coreset exactly sqrt(n); not a test.

Usage:
    .venv/bin/python benchmarks/thinning_slopes.py [--exps 8,10,12,14] [--seeds 5]
        [--methods target,root,plus] [--goodpoints] [--dim 2] [--tag NAME]
        [--out benchmarks/results/thinning_slopes.jsonl]

X ~ N(0, I_d) (seed s: default_rng(data_offset + s)), Gaussian kernel sigma^2 = 2d, m = log2(n) / 2 halving
rounds (even exponents only), so the coreset is exactly sqrt(n) = n / 2^m and no trim
step runs. MMD is measured to the true distribution N(0, I_d) in closed form. Each run
appends one JSON line (library, method, n, seed, mmd_p, time_s, tag) to --out; the
summary table (mean MMD per n and the log-log slope) is printed at the end.
goodpoints (the `bench` extra) runs `kt.thin(..., store_K=True)` on the same X with the
same split / swap kernels when --goodpoints is given.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import numpy as np

from distillkit.thinning import Gaussian, kt, mmd, mmd_to_gaussian


def _gp_kernel(y: np.ndarray, X: np.ndarray, var: float) -> np.ndarray:
    """Gaussian kernel exp(-|x-y|^2 / (2 var)) in goodpoints' calling convention."""
    return np.exp(-((X - y) ** 2).sum(-1) / (2.0 * var))


def _gp_plus(y: np.ndarray, X: np.ndarray, var: float) -> np.ndarray:
    """KT+ split kernel for the Gaussian: target plus root kernel, each sup-normalised."""
    return _gp_kernel(y, X, var) + _gp_kernel(y, X, var / 2.0)


def run_one(lib: str, method: str, X: np.ndarray, m: int, seed: int) -> tuple[np.ndarray, float]:
    """Coreset indices and wall time of one thinning run."""
    d = X.shape[1]
    var = 2.0 * d
    t0 = time.perf_counter()
    if lib == "distillkit":
        split = {"target": "target", "root": "root", "plus": "plus"}[method]
        idx = kt(X, Gaussian(np.sqrt(var)), m=m, split=split, seed=seed)
    else:
        from goodpoints import kt as gkt

        swap_k = partial(_gp_kernel, var=var)
        split_k = {
            "target": swap_k,
            "root": partial(_gp_kernel, var=var / 2.0),
            "plus": partial(_gp_plus, var=var),
        }[method]
        idx = np.asarray(gkt.thin(X, m, split_k, swap_k, delta=0.5, seed=seed, store_K=True))
    return idx, time.perf_counter() - t0


def summarise(rows: list[dict], metric: str = "mmd_p") -> str:
    """Markdown table: mean metric per n and the fitted log-log slope per (lib, method).

    Rows are grouped by (tag, library, method); a bootstrap over data seeds gives the
    slope's standard error.
    """
    rows = [r for r in rows if r.get(metric) is not None]
    keys = sorted({(r.get("tag", ""), r["library"], r["method"]) for r in rows})
    ns = sorted({r["n"] for r in rows})
    head = "| tag | library | method | " + " | ".join(f"n=2^{int(np.log2(n))}" for n in ns)
    lines = [head + " | seeds | slope | slope s.e. |", "|---" * (len(ns) + 6) + "|"]
    rng = np.random.default_rng(0)
    for tag, lib, meth in keys:
        sel = [r for r in rows if (r.get("tag", ""), r["library"], r["method"]) == (tag, lib, meth)]
        by = {}
        for r in sel:
            by.setdefault(r.get("data_seed", r["seed"]), {})[r["n"]] = r[metric]
        full = [v for v in by.values() if all(n in v for n in ns)]
        if not full:
            continue
        M = np.array([[v[n] for n in ns] for v in full])  # (seeds, sizes)
        x = np.log(np.array(ns, dtype=float))
        slope = np.polyfit(x, np.log(M.mean(0)), 1)[0]
        boot = [
            np.polyfit(x, np.log(M[rng.integers(0, len(M), len(M))].mean(0)), 1)[0]
            for _ in range(500)
        ]
        cells = " | ".join(f"{v:.3e}" for v in M.mean(0))
        lines.append(
            f"| {tag} | {lib} | {meth} | {cells} | {len(M)} | {slope:.3f} | {np.std(boot):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the grid, append JSON lines and print the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--exps", default="8,10,12,14", help="even powers of 2 for n")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--methods", default="target,root,plus")
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--goodpoints", action="store_true", help="also run goodpoints kt.thin")
    p.add_argument("--only-goodpoints", action="store_true")
    p.add_argument(
        "--data-offset", type=int, default=0, help="X of seed s: default_rng(offset + s)"
    )
    p.add_argument("--input-mmd", action="store_true", help="also the exact MMD to X (n^2)")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="benchmarks/results/thinning_slopes.jsonl")
    p.add_argument(
        "--report",
        default="",
        help="only summarise this JSONL file (mmd_p and mmd_input), optionally filtered by "
        "--data-offsets",
    )
    p.add_argument("--data-offsets", default="", help="with --report: data-seed blocks of 1000")
    a = p.parse_args()
    if a.report:
        with open(a.report) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        if a.data_offsets:
            offs = {int(o) for o in a.data_offsets.split(",")}
            rows = [r for r in rows if (r.get("data_seed", r["seed"]) // 1000) * 1000 in offs]
        for metric in ("mmd_p", "mmd_input"):
            print(f"\n{metric}:\n" + summarise(rows, metric))
        return
    exps = [int(e) for e in a.exps.split(",") if e]
    if any(e % 2 for e in exps):
        p.error("--exps must be even so that sqrt(n) = n / 2^m exactly")
    libs = [] if a.only_goodpoints else ["distillkit"]
    if a.goodpoints or a.only_goodpoints:
        libs.append("goodpoints")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    rows = []
    for e in exps:
        n, m = 2**e, e // 2
        for s in range(a.seeds):
            X = np.random.default_rng(a.data_offset + s).standard_normal((n, a.dim))
            for lib in libs:
                for meth in a.methods.split(","):
                    idx, sec = run_one(lib, meth, X, m, s)
                    row = {
                        "library": lib,
                        "method": meth,
                        "n": n,
                        "d": a.dim,
                        "seed": s,
                        "data_seed": a.data_offset + s,
                        "mmd_p": mmd_to_gaussian(X, np.sqrt(2.0 * a.dim), idx),
                        "time_s": round(sec, 4),
                        "mmd_input": (
                            mmd(X, Gaussian(np.sqrt(2.0 * a.dim)), indices=idx)
                            if a.input_mmd
                            else None
                        ),
                        "tag": a.tag,
                    }
                    rows.append(row)
                    with open(a.out, "a") as fh:  # append-only record
                        fh.write(json.dumps(row) + "\n")
            print(f"n=2^{e} seed {s} done", flush=True)
    print(summarise(rows))


if __name__ == "__main__":
    main()

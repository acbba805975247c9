"""Speed of kt / compresspp against goodpoints, with the kernel-block time shown; not a test.

Usage:
    .venv/bin/python benchmarks/thinning_speed.py [--sections kt,cpp] [--kt-exps 14]
        [--kt-dims 2,10] [--cpp-exps 18,20] [--seeds 2] [--gp-seeds 1] [--no-goodpoints]
        [--tag NAME] [--out benchmarks/results/thinning_speed.jsonl]

X ~ N(0, I_d), Gaussian kernel sigma^2 = 2d, coreset sqrt(n) (kt: m = log2(n) / 2), the same X
for both libraries. Every run appends a JSON line with wall and CPU (process) time; CPU time
is the number to compare on a shared machine, wall time is what a user waits.
"blocks" is the CPU time spent inside the kernel-block builders during the same run
(kt: the float32 split tiles; compresspp: the stored halving matrices and the final KT's
tiles), so that "total - blocks" is the remaining overhead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import numpy as np

from distillkit.thinning import Gaussian, compresspp, kt, mmd_to_gaussian

kt_mod = importlib.import_module("distillkit.thinning.kt")
halving_mod = importlib.import_module("distillkit.thinning.halving")
compress_mod = importlib.import_module("distillkit.thinning.compress")

BLOCK_CPU = [0.0]


def _timed_block(fn):
    """Wrap a block builder so that its CPU time is added to BLOCK_CPU."""

    def wrapper(*args, **kwargs):
        t = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            BLOCK_CPU[0] += time.process_time() - t

    return wrapper


def _instrument() -> None:
    kt_mod._exp_tile = _timed_block(kt_mod._exp_tile)
    kt_mod._two_blocks = _timed_block(kt_mod._two_blocks)
    compress_mod.kernel_matrices = _timed_block(halving_mod.kernel_matrices)


def _run(fn, *args, **kwargs):
    BLOCK_CPU[0] = 0.0
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return np.asarray(out), time.perf_counter() - w, time.process_time() - c, BLOCK_CPU[0]


def _gp_kernel(y, X, var):
    return np.exp(-((X - y) ** 2).sum(-1) / (2.0 * var))


def report(path: str) -> str:
    """Markdown table: mean CPU / wall time and MMD per (section, n, d, library)."""
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    keys = sorted({(r["section"], r["n"], r["d"]) for r in rows})
    out = [
        "| run | n | d | goodpoints CPU s (wall) | distillkit CPU s (wall) | blocks CPU s | "
        "CPU speed-up | MMD to P: goodpoints | MMD to P: distillkit | runs gp/dk |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sec, n, d in keys:
        sel = [r for r in rows if (r["section"], r["n"], r["d"]) == (sec, n, d)]
        gp = [r for r in sel if r["library"] == "goodpoints"]
        dk = [r for r in sel if r["library"] == "distillkit"]

        def cell(v, key):
            return f"{np.mean([r[key] for r in v]):.2f}" if v else "-"

        def both(v):
            return f"{cell(v, 'cpu_s')} ({cell(v, 'wall_s')})" if v else "-"

        ratio = (
            f"{np.mean([r['cpu_s'] for r in gp]) / np.mean([r['cpu_s'] for r in dk]):.1f}x"
            if gp and dk
            else "-"
        )
        mp = [f"{np.mean([r['mmd_p'] for r in v]):.3e}" if v else "-" for v in (gp, dk)]
        out.append(
            f"| {sec} | 2^{int(np.log2(n))} | {d} | {both(gp)} | {both(dk)} | "
            f"{cell(dk, 'blocks_cpu_s')} | {ratio} | {mp[0]} | {mp[1]} | {len(gp)}/{len(dk)} |"
        )
    return "\n".join(out)


def main() -> None:
    """Run the selected sections and append JSON lines."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sections", default="kt,cpp")
    p.add_argument("--kt-exps", default="14")
    p.add_argument("--kt-dims", default="2,10")
    p.add_argument("--cpp-exps", default="18,20")
    p.add_argument("--seeds", type=int, default=2, help="distillkit runs per configuration")
    p.add_argument("--gp-seeds", type=int, default=1, help="goodpoints runs per configuration")
    p.add_argument("--no-goodpoints", action="store_true")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="benchmarks/results/thinning_speed.jsonl")
    p.add_argument("--report", default="", help="only print a table of this JSONL file")
    a = p.parse_args()
    if a.report:
        print(report(a.report))
        return
    _instrument()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    load = os.getloadavg()[0]

    def emit(row):
        row.update(tag=a.tag, load_avg_1m=round(load, 2))
        with open(a.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def emit_ours(base, fn, X, sigma, **kw):
        """One distillkit run: its times, kernel-block time and MMD to N(0, I)."""
        idx, w, c, b = _run(fn, X, Gaussian(sigma), **kw)
        mp = mmd_to_gaussian(X, sigma, idx)
        emit(
            {
                **base,
                "library": "distillkit",
                "wall_s": w,
                "cpu_s": c,
                "blocks_cpu_s": b,
                "mmd_p": mp,
            }
        )

    secs = a.sections.split(",")
    if "kt" in secs:
        for d in [int(x) for x in a.kt_dims.split(",")]:
            for e in [int(x) for x in a.kt_exps.split(",")]:
                n, m, var = 2**e, e // 2, 2.0 * d
                for s in range(max(a.seeds, 0 if a.no_goodpoints else a.gp_seeds)):
                    X = np.random.default_rng(1000 + s).standard_normal((n, d))
                    base = {"section": "kt", "n": n, "d": d, "seed": s}
                    if s < a.seeds:
                        emit_ours(base, kt, X, np.sqrt(var), m=m, seed=s)
                    if not a.no_goodpoints and s < a.gp_seeds:
                        from functools import partial

                        from goodpoints import kt as gkt

                        gk = partial(_gp_kernel, var=var)
                        idx, w, c, _ = _run(gkt.thin, X, m, gk, gk, delta=0.5, seed=s, store_K=True)
                        mp = mmd_to_gaussian(X, np.sqrt(var), idx)
                        emit(
                            {**base, "library": "goodpoints", "wall_s": w, "cpu_s": c, "mmd_p": mp}
                        )
    if "cpp" in secs:
        d, g = 2, 4
        var = 2.0 * d
        for e in [int(x) for x in a.cpp_exps.split(",")]:
            n = 2**e
            for s in range(max(a.seeds, 0 if a.no_goodpoints else a.gp_seeds)):
                X = np.random.default_rng(2000 + s).standard_normal((n, d))
                base = {"section": "compresspp", "n": n, "d": d, "g": g, "seed": s}
                if s < a.seeds:
                    emit_ours(base, compresspp, X, np.sqrt(var), g=g, seed=s)
                if not a.no_goodpoints and s < a.gp_seeds:
                    from goodpoints import compress as gcomp

                    kp = np.array([2.0 * var])
                    idx, w, c, _ = _run(
                        gcomp.compresspp_kt, X, b"gaussian", k_params=kp, g=g, seed=s
                    )
                    mp = mmd_to_gaussian(X, np.sqrt(var), idx)
                    emit({**base, "library": "goodpoints", "wall_s": w, "cpu_s": c, "mmd_p": mp})


if __name__ == "__main__":
    main()

"""Compress++ bins as Dask tasks: the speed-up of 2 workers over 1 on this machine.

One X ~ N(0, I_d) of n points (memory-mapped .npy, as `distillkit thin` reads it), Gaussian
kernel sigma^2 = 2d, coreset sqrt(n), `num_bins` bins; each repeat runs `compresspp_dask` on a
LocalCluster of 1 and of 2 single-threaded workers (cluster start excluded from the time) and
checks that both give the single-process `compresspp` coreset. Rows are appended to
benchmarks/results/thinning_dask.jsonl.

    .venv/bin/python benchmarks/thinning_dask.py --exp 20 --dim 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "thinning_dask.jsonl"


def main() -> int:
    """Time 1 and 2 Dask workers on the same bins, append the rows, print the speed-up."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--exp", type=int, default=20, help="n = 2^exp points")
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--bins", type=int, default=4, help="Compress++ bins (Dask tasks)")
    p.add_argument("--workers", default="1,2", help="LocalCluster sizes to time")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    from dask.distributed import Client, LocalCluster

    from distillkit.thinning import Gaussian, compresspp
    from distillkit.thinning.distributed import compresspp_dask

    n, d = 2**args.exp, args.dim
    kernel = Gaussian(float(np.sqrt(2.0 * d)))  # sigma^2 = 2d, as the other thinning benchmarks
    rows = []
    with tempfile.TemporaryDirectory(prefix="thinning_dask_") as tmp:
        path = Path(tmp) / "x.npy"
        np.save(path, np.random.default_rng(args.seed).standard_normal((n, d)))
        X = np.load(path, mmap_mode="r")
        reference = compresspp(X, kernel, seed=args.seed, num_bins=args.bins)
        for workers in [int(w) for w in args.workers.split(",")]:
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, dashboard_address=None, processes=True
            )
            client = Client(cluster)
            try:
                for rep in range(args.repeats):
                    t0 = time.perf_counter()
                    idx = compresspp_dask(
                        X, kernel, seed=args.seed, num_bins=args.bins, client=client
                    )
                    wall = time.perf_counter() - t0
                    same = bool(np.array_equal(idx, reference))
                    row = {
                        "n": n, "d": d, "bins": args.bins, "workers": workers, "repeat": rep,
                        "wall_s": round(wall, 2), "same_coreset_as_compresspp": same,
                        "load_avg": [round(v, 2) for v in os.getloadavg()],
                        "host": f"{platform.machine()} {os.cpu_count()} cpus",
                    }  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                client.close()
                cluster.close()
    with Path(args.out).open("a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    best = {
        w: min(r["wall_s"] for r in rows if r["workers"] == w) for w in {r["workers"] for r in rows}
    }
    if 1 in best and 2 in best:
        print(f"2 workers vs 1 (best wall): {best[1] / best[2]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compress++ at scale through `distillkit thin`: wall time and peak memory; not a test.

Usage:
    .venv/bin/python benchmarks/thinning_scale.py [--exp 24] [--dim 10] [--workers 2]
        [--data bench_results/pts24.npy] [--tag NAME]
        [--out benchmarks/results/thinning_scale.jsonl]

Writes X ~ N(0, I_d) from default_rng(0), 2^20 rows at a time, to a float64 .npy (once: a file
of the right shape is reused), then runs `distillkit thin DATA --method compresspp --workers W`
under /usr/bin/time -v. The summed PSS of the command's process tree is sampled every 2 s from
/proc/PID/smaps_rollup (forked workers share the parent's pages; PSS counts a shared page once
in all). The CLI's own lines give the thinning time and its MMD estimates (coreset and an iid
subsample of the same size, against uniformly drawn input points). One JSON line is appended.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROWS = 1 << 20


def make_data(path: Path, n: int, d: int) -> None:
    """Write N(0, I_d) float64 rows from default_rng(0) to path, chunk by chunk (memory-mapped)."""
    if path.is_file():
        X = np.load(path, mmap_mode="r")
        if X.shape == (n, d) and X.dtype == np.float64:
            return
        raise SystemExit(
            f"{path} exists with shape {X.shape}, not ({n}, {d}): choose another --data"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=(n, d))
    rng = np.random.default_rng(0)
    for i in range(0, n, ROWS):
        out[i : i + ROWS] = rng.standard_normal((min(ROWS, n - i), d))
    out.flush()
    del out
    os.replace(tmp, path)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def tree_pss(root: int) -> int:
    """Summed PSS in bytes of root and all its descendants (0 for processes already gone)."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(_children(pid))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                m = re.search(r"^Pss:\s+(\d+) kB", fh.read(), re.M)
            total += int(m.group(1)) * 1024 if m else 0
        except OSError:
            pass
    return total


def main() -> None:
    """Run the CLI on the data set under /usr/bin/time and append one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exp", type=int, default=24, help="n = 2^exp points")
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default="bench_results/pts24.npy")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="benchmarks/results/thinning_scale.jsonl")
    a = p.parse_args()
    n, data = 2**a.exp, Path(a.data)
    make_data(data, n, a.dim)
    exe = Path(sys.executable).with_name("distillkit")
    cmd = ["/usr/bin/time", "-v", str(exe), "thin", str(data), "--method", "compresspp"]
    cmd += ["--workers", str(a.workers)]
    t0, peak = time.perf_counter(), 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))
        time.sleep(2.0)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"distillkit thin failed ({proc.returncode}):\n{err[-2000:]}")

    def grab(pattern: str, text: str) -> float:
        return float(re.search(pattern, text).group(1))

    row = {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": "compresspp",
        "n": n,
        "d": a.dim,
        "workers": a.workers,
        "coreset_size": int(grab(r"coreset size: (\d+)", out)),
        "seed": 0,
        "input": f"float64 .npy, memory-mapped, {data.stat().st_size:,} bytes, X ~ N(0, I) from "
        "default_rng(0) in 2^20-row chunks",
        "thin_seconds": grab(r"coreset size: \d+, ([\d.]+) s", out),
        "wall_s": round(wall, 1),
        "user_cpu_s": grab(r"User time \(seconds\): ([\d.]+)", err),
        "system_cpu_s": grab(r"System time \(seconds\): ([\d.]+)", err),
        "peak_pss_bytes": peak,
        "peak_over_input": round(peak / data.stat().st_size, 3),
        "mmd_coreset_est": grab(r"MMD\(coreset\)\s+= ([\d.e+-]+)", out),
        "mmd_iid_est": grab(r"MMD\(iid, same size\) = ([\d.e+-]+)", out),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "tag": a.tag,
        "command": " ".join(["/usr/bin/time", "-v", "distillkit"] + cmd[3:]),
        "host": f"{os.uname().machine} {os.cpu_count()} cpus",
    }
    with open(a.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

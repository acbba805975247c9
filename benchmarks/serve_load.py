"""Bounded loopback load test of `distillkit serve-teacher`.

Starts the real CLI server in a subprocess on a free port (an untrained model of the chosen size,
soft responses), then `--concurrency` client threads send `--requests` POST /v1/predict requests of
`--batch` float32 images as .npy. The key's budget is set to `(requests - expect_429) * batch`, so
exactly the last `--expect-429` requests must be refused: the run checks that the images served
(answers the clients received) equal the budget and the images charged (the server's persisted
count), and reports requests/s, images/s, p50/p99 latency and the error count (anything other than
200 or the expected 429s). Each run appends one JSON line to `--results` (never overwritten).

    python benchmarks/serve_load.py                      # 16 clients, 5,000 requests of 64
    python benchmarks/serve_load.py --requests 200       # a quick run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from distillkit.engine.checkpoint import save_checkpoint
from distillkit.models import build_model
from distillkit.teachers.keys import KeyStore

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.jsonl"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--model", default="cnn_small")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--responses", default="soft")
    p.add_argument("--expect-429", type=int, default=10, help="requests beyond the budget")
    p.add_argument("--server-threads", default="1", help="OMP_NUM_THREADS of the server")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--results", default=str(RESULTS), help="JSON-lines file the run appends to")
    p.add_argument("--src", default=None, help="run the server from this source tree")
    return p.parse_args()


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_workdir(
    model_name: str, channels: int, image_size: int, budget: int | None
) -> tuple[Path, str]:
    """A temporary directory with an untrained checkpoint and a keys file; returns (dir, key)."""
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    meta = {
        "name": model_name,
        "kwargs": {},
        "in_channels": channels,
        "num_classes": 10,
        "image_size": image_size,
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "classes": [str(i) for i in range(10)],
    }
    model = build_model(model_name, in_channels=channels, num_classes=10, image_size=image_size)
    save_checkpoint(
        {"model": model.state_dict(), "model_meta": meta, "epoch": 0, "config": {}}, work / "m.pt"
    )
    keys = KeyStore(work / "keys.json")
    key = keys.add("load", budget=budget)
    keys.save()
    return work, key


def start_server(
    work: Path, port: int, extra: list[str], threads: str = "1", src: str | None = None
) -> subprocess.Popen:
    """`distillkit serve-teacher` on work/m.pt in a subprocess (src: another source tree)."""
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if src is not None:
        env["PYTHONPATH"] = src
    cmd = [sys.executable, "-m", "distillkit", "serve-teacher", str(work / "m.pt")]
    cmd += ["--port", str(port), "--keys", str(work / "keys.json")]
    cmd += ["--state", str(work / "state.db"), *extra]
    with open(work / "server.err", "a") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stderr=log, stdout=log)


def wait_healthy(base: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    """Block until GET /healthz answers (SystemExit if the server dies or never answers)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=2).read()
            return
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start") from None
            time.sleep(0.2)


def npy_batch(batch: int, channels: int, image_size: int, seed: int = 0) -> bytes:
    """A .npy body of random float32 images in [0, 1]."""
    buf = io.BytesIO()
    x = np.random.default_rng(seed).random((batch, channels, image_size, image_size), np.float32)
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def post(url: str, key: str, body: bytes, timeout: float = 120) -> tuple[int, int]:
    """(status, images answered) of one POST; answers count only when the body parsed whole."""
    req = urllib.request.Request(
        url,
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = json.loads(resp.read())
            return resp.status, len(out.get("probs") or out.get("labels") or [])
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, 0


def charged(state: Path) -> int:
    """Images charged in a server's state file."""
    with sqlite3.connect(state) as conn:
        return int(conn.execute("SELECT COALESCE(SUM(spent), 0) FROM usage").fetchone()[0])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a running process has used (Linux; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def append_result(path: str | Path, result: dict) -> None:
    """Append one JSON line (with when and where it ran) to the results file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    row = {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_head": commit,
        "host": f"{platform.machine()} {os.cpu_count()} cpus",
        "argv": sys.argv[1:],
        **result,
    }
    with open(p, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def main() -> int:
    args = parse_args()
    expect_429 = min(args.expect_429, args.requests)
    budget = (args.requests - expect_429) * args.batch
    work, key = make_workdir(args.model, args.channels, args.image_size, budget)
    port = free_port()
    extra = ["--responses", args.responses, "--max-batch", str(max(256, args.batch))]
    extra += ["--log-file", str(work / "access.log")]
    server = start_server(work, port, extra, args.server_threads, src=args.src)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, server)

    body = npy_batch(args.batch, args.channels, args.image_size)
    counter = iter(range(args.requests))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    received = [0]

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                status, got = post(base + "/v1/predict", key, body)
            except Exception:
                status, got = -1, 0
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                statuses[status] = statuses.get(status, 0) + 1
                received[0] += got

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(server.pid)
    server.terminate()
    server.wait(60)

    ok = statuses.get(200, 0)
    refused = statuses.get(429, 0)
    served = received[0]
    spent = charged(work / "state.db")
    lat = sorted(latencies)
    result = {
        "kind": "load",
        "server_src": args.src or "working tree",
        "requests": args.requests,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "model": f"{args.model} {args.channels}x{args.image_size}x{args.image_size}",
        "wall_s": round(wall, 2),
        "requests_per_s": round(args.requests / wall, 1),
        "images_per_s": round(served / wall, 1),
        "p50_ms": round(1000 * statistics.median(lat), 2),
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
        "server_cpu_ms_per_request": None if cpu is None else round(1000 * cpu / args.requests, 2),
        "ok": ok,
        "refused_429": refused,
        "errors": args.requests - ok - refused,
        "budget": budget,
        "images_served": served,
        "images_charged": spent,
        "charged_minus_served": spent - served,
        "budget_exact": served == budget == spent and refused == expect_429,
        "server_exit": server.returncode,
    }
    print("| " + " | ".join(result) + " |")
    print("|" + "---|" * len(result))
    print("| " + " | ".join(str(v) for v in result.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    append_result(args.results, result)
    return 0 if result["budget_exact"] and result["errors"] == 0 else 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

"""Bounded loopback load test of `distillkit serve-teacher`.

Starts the real CLI server in a subprocess on a free port (an untrained model of the chosen size,
soft responses), then `--concurrency` client threads send `--requests` POST /v1/predict requests of
`--batch` float32 images as .npy. The key's budget is set to `(requests - expect_429) * batch`, so
exactly the last `--expect-429` requests must be refused: the run checks that the images served
equal the budget exactly, that the server's persisted count agrees, and reports requests/s,
images/s, p50/p99 latency and the error count (anything other than 200 or the expected 429s).

    python benchmarks/serve_load.py                      # 16 clients, 5,000 requests of 64
    python benchmarks/serve_load.py --requests 200       # a quick run
"""

from __future__ import annotations

import argparse
import io
import json
import os
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
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, key: str, body: bytes) -> int:
    req = urllib.request.Request(
        url,
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def main() -> int:
    args = parse_args()
    expect_429 = min(args.expect_429, args.requests)
    budget = (args.requests - expect_429) * args.batch
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    meta = {
        "name": args.model,
        "kwargs": {},
        "in_channels": args.channels,
        "num_classes": 10,
        "image_size": args.image_size,
        "mean": [0.5] * args.channels,
        "std": [0.25] * args.channels,
        "classes": [str(i) for i in range(10)],
    }
    model = build_model(
        args.model, in_channels=args.channels, num_classes=10, image_size=args.image_size
    )
    save_checkpoint(
        {"model": model.state_dict(), "model_meta": meta, "epoch": 0, "config": {}}, work / "m.pt"
    )
    keys = KeyStore(work / "keys.json")
    key = keys.add("load", budget=budget)
    keys.save()
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=args.server_threads, MKL_NUM_THREADS=args.server_threads)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distillkit",
            "serve-teacher",
            str(work / "m.pt"),
            "--port",
            str(port),
            "--keys",
            str(work / "keys.json"),
            "--state",
            str(work / "state.db"),
            "--responses",
            args.responses,
            "--max-batch",
            str(max(256, args.batch)),
            "--log-file",
            str(work / "access.log"),
        ],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=2).read()
            break
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start") from None
            time.sleep(0.2)

    buf = io.BytesIO()
    x = np.random.default_rng(0).random(
        (args.batch, args.channels, args.image_size, args.image_size), dtype=np.float32
    )
    np.save(buf, x, allow_pickle=False)
    body = buf.getvalue()
    counter = iter(range(args.requests))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                status = post(base + "/v1/predict", key, body)
            except Exception:
                status = -1
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                statuses[status] = statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server.terminate()
    server.wait(60)

    ok = statuses.get(200, 0)
    refused = statuses.get(429, 0)
    served = ok * args.batch
    spent = sqlite3.connect(work / "state.db").execute("SELECT SUM(spent) FROM usage").fetchone()[0]
    lat = sorted(latencies)
    result = {
        "requests": args.requests,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "model": f"{args.model} {args.channels}x{args.image_size}x{args.image_size}",
        "wall_s": round(wall, 2),
        "requests_per_s": round(args.requests / wall, 1),
        "images_per_s": round(served / wall, 1),
        "p50_ms": round(1000 * statistics.median(lat), 2),
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
        "ok": ok,
        "refused_429": refused,
        "errors": args.requests - ok - refused,
        "budget": budget,
        "images_served": served,
        "server_spent": spent,
        "budget_exact": served == budget == spent and refused == expect_429,
        "server_exit": server.returncode,
    }
    print("| " + " | ".join(result) + " |")
    print("|" + "---|" * len(result))
    print("| " + " | ".join(str(v) for v in result.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["budget_exact"] and result["errors"] == 0 else 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

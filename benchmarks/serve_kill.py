"""`kill -9` of `distillkit serve-teacher` under load: images charged vs images received.

Starts the real CLI server in a subprocess (an untrained model, soft answers, an unlimited key),
loads it with `--clients` threads sending POST /v1/predict batches of `--batch` images, and
`--kills` times kills it with SIGKILL in the middle of the load, restarts it on the same state
file and lets the load go on. Clients count the images of every answer they receive whole; a
request cut by the kill counts nothing and is sent again after the restart (without an
Idempotency-Key, so every answer is a fresh charge). At the end the server is stopped gracefully and
the images charged in its SQLite state are compared with the images the clients received:

- charged - served > 0: answers charged but never delivered (the clients paid for nothing);
- charged - served < 0: answers delivered whose charge the kill interrupted (the server's loss).

`--src DIR` runs the server from another source tree (e.g. an older checkout) for comparison.
Each run appends one JSON line to `--results` (never overwritten).

    python benchmarks/serve_kill.py                       # 8 clients, 3 kills
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import torch

# the shared load-test helpers sit beside this script; runpy and other callers need the folder
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_load import (  # noqa: E402
    RESULTS,
    append_result,
    charged,
    free_port,
    make_workdir,
    npy_batch,
    post,
    start_server,
    wait_healthy,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--phase", type=float, default=6.0, help="seconds of load before each kill")
    p.add_argument("--model", default="cnn_small")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--src", default=None, help="run the server from this source tree")
    p.add_argument("--results", default=str(RESULTS), help="JSON-lines file the run appends to")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    work, key = make_workdir(args.model, 1, args.image_size, budget=None)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = ["--max-batch", str(max(256, args.batch)), "--log-file", str(work / "access.log")]
    body = npy_batch(args.batch, 1, args.image_size)
    lock, stop = threading.Lock(), threading.Event()
    counts = {"ok": 0, "served": 0, "cut": 0, "refused_conn": 0, "other": 0}

    def client() -> None:
        while not stop.is_set():
            try:
                status, got = post(base + "/v1/predict", key, body, timeout=60)
            except (ConnectionRefusedError, OSError) as exc:
                refused = isinstance(getattr(exc, "reason", exc), ConnectionRefusedError)
                with lock:
                    counts["refused_conn" if refused else "cut"] += 1
                time.sleep(0.05)
                continue
            except Exception:  # e.g. a truncated answer that does not parse
                with lock:
                    counts["cut"] += 1
                continue
            with lock:
                if status == 200:
                    counts["ok"] += 1
                    counts["served"] += got
                else:
                    counts["other"] += 1

    server = start_server(work, port, extra, src=args.src)
    wait_healthy(base, server)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    for _ in range(args.kills):
        time.sleep(args.phase)
        os.kill(server.pid, signal.SIGKILL)
        server.wait()  # reaped: its reservations now belong to a dead process
        server = start_server(work, port, extra, src=args.src)
        wait_healthy(base, server)
    time.sleep(args.phase)
    stop.set()
    for t in threads:
        t.join(120)
    wall = time.perf_counter() - t0
    server.send_signal(signal.SIGTERM)
    server.wait(60)
    spent = charged(work / "state.db")
    result = {
        "kind": "kill9",
        "server_src": args.src or "working tree",
        "clients": args.clients,
        "batch": args.batch,
        "kills": args.kills,
        "model": f"{args.model} 1x{args.image_size}x{args.image_size}",
        "wall_s": round(wall, 1),
        "requests_ok": counts["ok"],
        "requests_cut": counts["cut"],
        "connect_refused": counts["refused_conn"],
        "other_status": counts["other"],
        "images_served": counts["served"],
        "images_charged": spent,
        "charged_minus_served": spent - counts["served"],
        "server_exit": server.returncode,
        "workdir": str(work),
    }
    for k, v in result.items():
        print(f"{k:>22}: {v}")
    append_result(args.results, result)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

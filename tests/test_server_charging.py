"""Teacher server charging: a charge follows delivery, and Idempotency-Key retries are paid once."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distillkit.models import build_model  # noqa: E402
from distillkit.teachers.keys import BudgetStore, KeyStore  # noqa: E402
from distillkit.teachers.server import (  # noqa: E402
    ServerSettings,
    ServerThread,
    TeacherService,
    create_app,
)
from tests.test_server import META, call, images, npy  # noqa: E402


class Slow(nn.Module):
    """A model whose forward takes `delay` seconds, so a client can act while it runs."""

    def __init__(self, inner: nn.Module, delay: float):
        super().__init__()
        self.inner, self.delay = inner, delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.inner(x)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("mlp", in_channels=1, num_classes=10, image_size=8)


def serve(model, state: Path, budget: int | None = 100, delay: float = 0.0, **kw):
    """A server in a thread with one key; returns (server, key, key_id)."""
    keys = KeyStore()
    key = keys.add("alice", budget=budget)
    net = Slow(model, delay) if delay else model
    app = create_app(
        TeacherService(net, META), keys, BudgetStore(state), ServerSettings(max_batch=300, **kw)
    )
    return ServerThread(app).start(), key, key.split("-")[1]


def post(url: str, key: str, body: bytes, idem: str | None = None):
    """(status, headers, parsed body) of one POST /v1/predict."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy"}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    req = urllib.request.Request(url + "/v1/predict", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def wait_for_remaining(url: str, key: str, want: int, timeout: float = 5.0) -> int:
    """Poll /v1/info until `remaining` equals want (or the timeout); returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = call(url, "/v1/info", key)[1]["remaining"]
        if remaining == want or time.monotonic() > deadline:
            return remaining
        time.sleep(0.05)


def test_client_gone_before_the_answer_is_not_charged(model, tmp_path):
    server, key, key_id = serve(model, tmp_path / "s.db", budget=1000, delay=0.4)
    body = npy(images(256))
    try:
        for _ in range(2):
            sock = socket.create_connection((server.host, server.port))
            head = (
                f"POST /v1/predict HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/x-npy\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
            time.sleep(0.1)  # the request is in; inference is running
            sock.close()
            assert wait_for_remaining(server.url, key, 1000) == 1000
        # a client that stays gets its answer and pays for it
        assert post(server.url, key, npy(images(3)))[2]["remaining"] == 997
    finally:
        server.stop()
    assert BudgetStore(tmp_path / "s.db").spent(key_id) == 3


def test_reservations_of_a_killed_server_are_released_on_restart(tmp_path):
    state = tmp_path / "s.db"
    # a server process that reserved 5 images and was killed before it could answer
    script = (
        "import os, sys\n"
        "from distillkit.teachers.keys import BudgetStore\n"
        "store = BudgetStore(sys.argv[1])\n"
        "assert store.reserve('k', 5, 100)[0]\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(state)], timeout=60)
    assert proc.returncode == -9
    store = BudgetStore(state)  # what a restarted server opens
    try:
        assert store.spent("k") == 0 and store.remaining("k", 100) == 100
    finally:
        store.close()


def test_idempotent_retry_is_answered_again_without_a_second_charge(model, tmp_path):
    server, key, _ = serve(model, tmp_path / "s.db", budget=100)
    body, other = npy(images(4)), npy(images(4, seed=1))
    try:
        status, headers, first = post(server.url, key, body, idem="batch-1")
        assert status == 200 and first["remaining"] == 96
        assert "Idempotent-Replayed" not in headers
        status, headers, again = post(server.url, key, body, idem="batch-1")
        assert status == 200 and again == first
        assert headers["Idempotent-Replayed"] == "true"
        # the same key with another body is refused, naming the problem, and costs nothing
        status, _, out = post(server.url, key, other, idem="batch-1")
        assert status == 422 and out["error"]["code"] == "idempotency_key_reused"
        assert "Idempotency-Key" in out["error"]["message"]
        for bad in ("x" * 129, "has space", "semi;colon", ""):
            status, _, out = post(server.url, key, body, idem=bad)
            assert (status, out["error"]["code"]) == (400, "bad_idempotency_key"), bad
        # without the header every request is a new one
        assert post(server.url, key, body)[2]["remaining"] == 92
        assert call(server.url, "/v1/info", key)[1]["remaining"] == 92
    finally:
        server.stop()


def test_idempotent_replies_survive_a_restart(model, tmp_path):
    state = tmp_path / "s.db"
    keys = KeyStore()
    key = keys.add("bob", budget=10)
    body = npy(images(6))

    def start():
        app = create_app(TeacherService(model, META), keys, BudgetStore(state))
        return ServerThread(app).start()

    server = start()
    first = post(server.url, key, body, idem="a" * 64)
    server.stop()
    server = start()
    try:
        status, headers, again = post(server.url, key, body, idem="a" * 64)
        # replayed although the batch no longer fits the remaining budget of 4
        assert status == 200 and headers["Idempotent-Replayed"] == "true"
        assert again == first[2] and call(server.url, "/v1/info", key)[1]["remaining"] == 4
    finally:
        server.stop()


def test_concurrent_duplicates_are_charged_once(model, tmp_path):
    server, key, key_id = serve(model, tmp_path / "s.db", budget=100, delay=0.3)
    body = npy(images(5))
    results, gate = [], threading.Barrier(6)

    def client():
        gate.wait()
        results.append(post(server.url, key, body, idem="dup"))

    try:
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.stop()
    assert [r[0] for r in results] == [200] * 6
    assert all(r[2] == results[0][2] for r in results)
    assert sum("Idempotent-Replayed" not in r[1] for r in results) == 1
    assert BudgetStore(tmp_path / "s.db").spent(key_id) == 5


def test_idempotency_entries_expire(model, tmp_path):
    server, key, _ = serve(model, tmp_path / "s.db", budget=100, idempotency_ttl=0.3)
    body = npy(images(2))
    try:
        assert post(server.url, key, body, idem="k1")[2]["remaining"] == 98
        assert post(server.url, key, body, idem="k1")[1]["Idempotent-Replayed"] == "true"
        time.sleep(0.5)
        status, headers, out = post(server.url, key, body, idem="k1")
        assert status == 200 and "Idempotent-Replayed" not in headers and out["remaining"] == 96
        time.sleep(0.5)
        assert post(server.url, key, body, idem="k2")[0] == 200
    finally:
        server.stop()
    # the store holds only what has not expired (k1 went when k2 was written)
    with sqlite3.connect(tmp_path / "s.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        rows = sum(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables)
        assert rows <= 2  # the usage row and the reply of k2


class Broken(nn.Module):
    """A model whose forward fails with internal details in the message."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"CUDA error at {hex(id(self))}")


def test_failed_inference_is_a_fixed_500_and_not_charged(model, tmp_path):
    keys = KeyStore()
    key = keys.add("alice", budget=10)
    app = create_app(TeacherService(Broken(model), META), keys, BudgetStore(tmp_path / "s.db"))
    server = ServerThread(app).start()
    try:
        status, _, out = post(server.url, key, npy(images(4)), idem="x1")
        assert status == 500 and "0x" not in json.dumps(out)
        assert out["error"]["code"] == "internal"
        assert call(server.url, "/v1/info", key)[1]["remaining"] == 10
    finally:
        server.stop()

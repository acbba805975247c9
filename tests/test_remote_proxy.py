"""RemoteTeacher against the real teacher server behind a delaying TCP proxy on 127.0.0.1.

A retry after a client timeout must not be charged again (the batch's Idempotency-Key lets the
server replay its answer), and consecutive requests share one kept-alive connection.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distillkit.models import build_model  # noqa: E402
from distillkit.teachers.keys import BudgetStore, KeyStore  # noqa: E402
from distillkit.teachers.remote import RemoteTeacher, RemoteTeacherError  # noqa: E402
from distillkit.teachers.server import (  # noqa: E402
    ServerSettings,
    ServerThread,
    TeacherService,
    create_app,
)

META = {
    "name": "mlp",
    "kwargs": {},
    "in_channels": 1,
    "num_classes": 10,
    "image_size": 8,
    "mean": [0.3],
    "std": [0.4],
    "classes": [str(i) for i in range(10)],
}
BUDGET = 100


class DelayProxy:
    """Forwards TCP to a port; counts accepted connections; holds each answer chunk `delay` s.

    When the client gives up (closes), the upstream connection stays open, so the server still
    finishes and charges, as a real network does when only the answer is slow.
    """

    def __init__(self, upstream_port: int, delay: float = 0.0):
        self.upstream_port = upstream_port
        self.delay = delay
        self.accepted = 0
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        while True:
            try:
                data = client.recv(65536)
                if not data:
                    return
                upstream.sendall(data)
            except OSError:
                return

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        client_gone = False
        while True:
            try:
                data = upstream.recv(65536)
                arrived = time.monotonic()
            except OSError:
                return
            if not data:
                break
            wait = arrived + self.delay - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not client_gone:
                try:
                    client.sendall(data)
                except OSError:
                    client_gone = True  # keep draining the server's answers
        try:
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        """Stop accepting and close every forwarded connection."""
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def server(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, num_classes=10, image_size=8).eval()
    keys = KeyStore()
    key = keys.add("t", budget=BUDGET)
    app = create_app(
        TeacherService(model, META, "soft"),
        keys,
        BudgetStore(tmp_path / "state.db"),
        ServerSettings(max_batch=16),
    )
    thread = ServerThread(app).start()
    proxy = DelayProxy(thread.port)
    yield thread, proxy, key, model
    proxy.close()
    thread.stop()


def charged(url: str, key: str) -> int:
    """Images the server charged this key, asked directly (not through the proxy)."""
    req = urllib.request.Request(url + "/v1/info", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return BUDGET - int(json.loads(resp.read())["remaining"])


def pixels(n: int, seed: int) -> torch.Tensor:
    """Images in [0, 1]."""
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_retry_after_a_timeout_is_not_charged_twice(server):
    thread, proxy, key, model = server
    teacher = RemoteTeacher(proxy.url, key, backoff=0.01)
    proxy.delay = 0.5  # every answer now arrives 0.5 s late
    # the client gives up: three attempts, each timing out before the answer arrives
    teacher.timeout, teacher.max_timeout, teacher.retries = 0.1, 0.2, 2
    with pytest.raises(RemoteTeacherError, match="after 2 retries"):
        teacher(pixels(10, seed=0))
    assert charged(thread.url, key) == 10  # once, not once per attempt
    # the timeout doubles per timed-out attempt (0.2, 0.4, 0.8 s): the third attempt gets it
    teacher.timeout, teacher.max_timeout, teacher.retries = 0.2, 0.8, 3
    x = pixels(10, seed=1)
    out = teacher(x)
    assert charged(thread.url, key) == 20 and teacher.retried == 2 + 2
    with torch.no_grad():
        ref = torch.softmax(model((x - 0.3) / 0.4), 1)
    torch.testing.assert_close(out.probs, ref, atol=2e-5, rtol=0)
    assert teacher.stats()["replays"] == 1  # the answer that arrived was the server's replay


def test_requests_share_one_connection(server):
    thread, proxy, key, _ = server
    teacher = RemoteTeacher(proxy.url, key, batch_size=4)
    for seed in range(3):
        teacher(pixels(10, seed=seed))  # 3 requests each
    assert teacher.requests == 1 + 9 and proxy.accepted == 1
    assert charged(thread.url, key) == 30

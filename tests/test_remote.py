"""RemoteTeacher over loopback HTTP: protocol, batching, disk cache, retries and error mapping."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distillkit.models import build_model  # noqa: E402
from distillkit.teachers import BudgetExceededError, Teacher  # noqa: E402
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
MEAN, STD = (0.3,), (0.4,)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("mlp", in_channels=1, num_classes=10, image_size=8).eval()


@pytest.fixture
def served(model, tmp_path):
    """Factory: a running server (stopped at teardown) and its key."""
    servers = []

    def make(responses: str = "soft", budget: int | None = 100, max_batch: int = 16):
        keys = KeyStore()
        key = keys.add("t", budget=budget)
        app = create_app(
            TeacherService(model, META, responses),
            keys,
            BudgetStore(tmp_path / f"state{len(servers)}.db"),
            ServerSettings(max_batch=max_batch),
        )
        servers.append(ServerThread(app).start())
        return servers[-1], key

    yield make
    for s in servers:
        s.stop()


def normalized(n: int, seed: int = 0) -> torch.Tensor:
    """Inputs as the trainer hands them to teachers: normalised pixels."""
    pixels = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (pixels - 0.3) / 0.4


def test_soft_answers_match_the_model_and_batches_are_split(model, served, tmp_path):
    server, key = served("soft", max_batch=16)
    teacher = RemoteTeacher(server.url, key, input_mean=MEAN, input_std=STD)
    assert isinstance(teacher, Teacher) and teacher.kind == "soft"
    x = normalized(40)
    out = teacher(x)
    with torch.no_grad():
        ref = torch.softmax(model(x), 1)
    torch.testing.assert_close(out.probs, ref, atol=2e-5, rtol=0)
    assert teacher.queries == 40
    assert teacher.requests == 1 + 3  # /v1/info, then 16 + 16 + 8
    assert teacher.bytes_sent > 40 * 64 * 4 and teacher.bytes_received > 0
    assert teacher.info()["remaining"] == 60


def test_hard_and_topk_answers(model, served):
    x = normalized(9)
    with torch.no_grad():
        ref = torch.softmax(model(x), 1)
    server, key = served("hard")
    hard = RemoteTeacher(server.url, key, input_mean=MEAN, input_std=STD)
    assert hard.kind == "hard"
    assert torch.equal(hard(x).labels, ref.argmax(1))
    server, key = served("topk:3")
    topk = RemoteTeacher(server.url, key, input_mean=MEAN, input_std=STD)
    probs = topk(x).probs
    assert topk.kind == "soft"
    torch.testing.assert_close(probs.sum(1), torch.ones(9), atol=1e-4, rtol=0)
    top = ref.topk(3, 1)
    torch.testing.assert_close(probs.gather(1, top.indices), top.values, atol=2e-5, rtol=0)


def test_cache_avoids_a_second_spend(served, tmp_path):
    server, key = served("soft", budget=30)
    cache = tmp_path / "cache"
    teacher = RemoteTeacher(server.url, key, cache_dir=cache, input_mean=MEAN, input_std=STD)
    x = normalized(20)
    first = teacher(x).probs
    assert teacher.queries == 20 and teacher.info()["remaining"] == 10
    again = teacher(x[[3, 1, 3]]).probs  # repeats, also within one batch
    assert teacher.queries == 20 and teacher.cache_hits == 3
    torch.testing.assert_close(again, first[[3, 1, 3]])
    # a new client on the same cache directory (e.g. a resumed run) spends nothing either
    fresh = RemoteTeacher(server.url, key, cache_dir=cache, input_mean=MEAN, input_std=STD)
    torch.testing.assert_close(fresh(x).probs, first)
    assert fresh.queries == 0 and fresh.info()["remaining"] == 10
    # new images past the server's budget: the 10 that still fit are bought, the rest refused
    nocache = RemoteTeacher(server.url, key, input_mean=MEAN, input_std=STD)
    with pytest.raises(BudgetExceededError, match="budget exhausted"):
        nocache(normalized(20, seed=1))
    assert nocache.queries == 10 and nocache.info()["remaining"] == 0


def test_wrong_key_is_permission_error(served):
    server, key = served()
    with pytest.raises(PermissionError, match="401"):
        RemoteTeacher(server.url, key[:-2] + "zz")


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers /v1/info; POSTs follow the class-level script of status codes."""

    script: list[int] = []
    posts = 0

    def log_message(self, *args):
        pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(
            200, {"responses": "hard", "num_classes": 10, "input_shape": [1, 8, 8], "max_batch": 64}
        )

    def do_POST(self):
        n = int(self.headers["Content-Length"])
        arr = np.lib.format.read_array(__import__("io").BytesIO(self.rfile.read(n)))
        type(self).posts += 1
        status = type(self).script.pop(0) if type(self).script else 200
        if status == 200:
            self._send(200, {"responses": "hard", "labels": [1] * len(arr), "remaining": None})
        else:
            self._send(status, {"error": {"code": "x", "message": f"status {status}"}})


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.posts = 0
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_retries_5xx_with_backoff_but_never_4xx(stub):
    _, url = stub
    _Stub.script = [503, 500]
    teacher = RemoteTeacher(url, "k", backoff=0.01)
    assert teacher(normalized(3)).labels.tolist() == [1, 1, 1]
    assert _Stub.posts == 3 and teacher.retried == 2 and teacher.queries == 3
    _Stub.posts, _Stub.script = 0, [422]
    with pytest.raises(RemoteTeacherError, match="422"):
        teacher(normalized(3, seed=1))
    assert _Stub.posts == 1  # a client error is not retried
    _Stub.posts, _Stub.script = 0, [503] * 10
    teacher.retries = 2
    with pytest.raises(RemoteTeacherError, match="after 2 retries"):
        teacher(normalized(3, seed=2))
    assert _Stub.posts == 3


def test_retries_connection_errors(stub):
    _, url = stub
    teacher = RemoteTeacher(url, "k", backoff=0.01, retries=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        teacher.url = dead
        with pytest.raises(RemoteTeacherError, match="after 2 retries"):
            teacher(normalized(2))
    assert teacher.retried == 2 and teacher.queries == 0

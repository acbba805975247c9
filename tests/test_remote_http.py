"""RemoteTeacher's HTTP behaviour against tiny stub servers on 127.0.0.1 (no FastAPI needed).

Idempotency keys on retries, redirects that must not receive the API key, one kept-alive
connection, reconnecting after the server dropped an idle connection, a 429 that reports what still
fits, and one-line error messages that never contain the key.
"""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from distillkit.teachers import BudgetExceededError
from distillkit.teachers.remote import RemoteTeacher, RemoteTeacherError

INFO = {"responses": "hard", "num_classes": 10, "input_shape": [1, 8, 8], "max_batch": 64}
KEY = "dk-abcd1234-s3cr3t-value-that-must-never-be-printed"

# reply(method, path, headers, body) -> (status, payload, extra headers); payload dict or bytes
Reply = Callable[[str, str, dict[str, str], bytes], tuple[int, Any, dict[str, str]]]


class Stub:
    """An HTTP/1.1 server in a thread: records every request and connection, answers via reply."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.seen: list[dict[str, Any]] = []
        self.connections = 0
        self.close_after_each = False  # drop the connection after each answer, unannounced
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                owner.connections += 1

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                owner.seen.append(
                    {"method": self.command, "path": self.path, "headers": headers, "body": body}
                )
                status, payload, extra = owner.reply(self.command, self.path, headers, body)
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(raw)
                if owner.close_after_each:
                    self.close_connection = True

            do_GET = do_POST = _any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None  # late writes to a client that timed out
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def posts(self) -> list[dict[str, Any]]:
        """The POST requests seen so far."""
        return [r for r in self.seen if r["method"] == "POST"]

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stubs():
    made: list[Stub] = []

    def make(reply: Reply) -> Stub:
        made.append(Stub(reply))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def rows_of(body: bytes) -> int:
    """Images in a .npy request body."""
    return len(np.lib.format.read_array(io.BytesIO(body), allow_pickle=False))


def labels(body: bytes) -> dict[str, Any]:
    """A hard answer of label 1 for every image in the body."""
    return {"responses": "hard", "labels": [1] * rows_of(body), "remaining": None}


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Pixels in [0, 1] (the stub client has no normalisation)."""
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_same_idempotency_key_on_every_retry_and_another_per_batch(stubs):
    slow = {"left": 2}

    def reply(method, path, headers, body):
        if method == "GET":
            return 200, INFO, {}
        if slow["left"]:
            slow["left"] -= 1
            time.sleep(0.35)  # longer than the first two attempts wait: they time out
        return 200, labels(body), {}

    stub = stubs(reply)
    teacher = RemoteTeacher(stub.url, KEY, timeout=0.1, retries=3, backoff=0.01)
    assert teacher(images(5)).labels.tolist() == [1] * 5
    assert teacher(images(5, seed=1)).labels.tolist() == [1] * 5
    keys = [p["headers"].get("idempotency-key") for p in stub.posts()]
    assert len(keys) == 4 and teacher.retried == 2
    assert all(k is not None and len(k) == 64 and int(k, 16) >= 0 for k in keys)
    assert keys[0] == keys[1] == keys[2]  # every attempt of one batch
    assert keys[3] != keys[0]  # another batch, another key
    # the key depends on the content only: another client retrying the same batch sends it too
    again = RemoteTeacher(stub.url, KEY)
    again(images(5))
    assert stub.posts()[-1]["headers"]["idempotency-key"] == keys[0]


def test_409_for_a_key_still_in_progress_is_retried_with_the_same_key(stubs):
    conflicts = {"left": 1}

    def reply(method, path, headers, body):
        if method == "GET":
            return 200, INFO, {}
        if conflicts["left"]:
            conflicts["left"] -= 1
            error = {"code": "in_progress", "message": "a request with this key is in progress"}
            return 409, {"error": error}, {}
        return 200, labels(body), {}

    stub = stubs(reply)
    teacher = RemoteTeacher(stub.url, KEY, retries=2, backoff=0.01)
    assert teacher(images(4)).labels.tolist() == [1] * 4
    keys = [p["headers"].get("idempotency-key") for p in stub.posts()]
    assert len(keys) == 2 and keys[0] is not None and keys[0] == keys[1] and teacher.retried == 1


@pytest.mark.parametrize(("method", "status"), [("GET", 302), ("POST", 303), ("POST", 307)])
def test_redirect_to_another_origin_never_receives_the_key(stubs, method, status):
    target = stubs(lambda m, p, h, b: (200, INFO if m == "GET" else labels(b), {}))

    def reply(m, path, headers, body):
        if m == method:
            return status, {"moved": True}, {"Location": target.url + path}
        return 200, INFO if m == "GET" else labels(body), {}

    origin = stubs(reply)
    error: Exception | None = None
    try:
        RemoteTeacher(origin.url, KEY)(images(2))
    except Exception as exc:  # checked below, after the key's whereabouts
        error = exc
    assert all("authorization" not in r["headers"] for r in target.seen)
    # refused with one line that names the redirect and its target
    assert isinstance(error, RemoteTeacherError), error
    message = str(error)
    assert target.url in message and str(status) in message
    assert "\n" not in message and KEY not in message


def test_requests_reuse_one_connection(stubs):
    stub = stubs(lambda m, p, h, b: (200, INFO if m == "GET" else labels(b), {}))
    teacher = RemoteTeacher(stub.url, KEY, batch_size=4)
    for seed in range(3):
        teacher(images(10, seed=seed))  # 3 requests each
    assert len(stub.seen) == 1 + 9 and stub.connections == 1


def test_reconnects_when_the_server_dropped_the_connection(stubs):
    stub = stubs(lambda m, p, h, b: (200, INFO if m == "GET" else labels(b), {}))
    stub.close_after_each = True  # as a server does when its keep-alive timeout expires
    teacher = RemoteTeacher(stub.url, KEY, batch_size=4, retries=0)
    assert teacher(images(10)).labels.tolist() == [1] * 10
    assert len(stub.posts()) == 3 and teacher.retried == 0 and stub.connections == 4


def test_429_sends_the_part_that_fits_then_raises(stubs):
    budget = {"left": 5}

    def reply(method, path, headers, body):
        if method == "GET":
            return 200, INFO, {}
        n = rows_of(body)
        if n > budget["left"]:
            left = budget["left"]
            msg = f"query budget exhausted: {left} images remain, the batch has {n}"
            error = {"code": "budget_exhausted", "message": msg, "remaining": left}
            return 429, {"error": error}, {"X-Budget-Remaining": str(left)}
        budget["left"] -= n
        return 200, labels(body), {"X-Budget-Remaining": str(budget["left"])}

    stub = stubs(reply)
    teacher = RemoteTeacher(stub.url, KEY)
    x = images(8)
    with pytest.raises(BudgetExceededError) as info:
        teacher(x)
    message = str(info.value)
    assert "\n" not in message and "429" in message and "5" in message and "3" in message
    assert [rows_of(p["body"]) for p in stub.posts()] == [8, 5]
    assert budget["left"] == 0 and teacher.queries == 5
    # the five bought answers were kept: asking for them again costs nothing
    assert teacher(x[:5]).labels.tolist() == [1] * 5 and len(stub.posts()) == 2


def test_error_messages_are_one_line_and_never_contain_the_key(stubs):
    def reply(method, path, headers, body):
        if method == "GET":
            return 200, INFO, {}
        echo = headers.get("authorization", "")
        if rows_of(body) == 3:
            error = {"code": "bad_input", "message": f"images rejected\nyou sent {echo}"}
            return 422, {"error": error}, {}
        return 503, f"upstream down\n\tgot {echo}".encode(), {}

    stub = stubs(reply)
    teacher = RemoteTeacher(stub.url, KEY, retries=1, backoff=0.01)
    with pytest.raises(RemoteTeacherError) as client_error:
        teacher(images(3))
    with pytest.raises(RemoteTeacherError) as server_error:
        teacher(images(2))
    for exc, status, text in ((client_error, 422, "images rejected"), (server_error, 503, "down")):
        message = str(exc.value)
        assert "\n" not in message and "\t" not in message, message
        assert str(status) in message and text in message, message
        assert KEY not in message and KEY[-20:] not in message, message

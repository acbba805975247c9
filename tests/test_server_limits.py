"""Teacher server limits: key revocation while running, timeouts, concurrency, logs, latency, docs."""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distillkit.cli import main  # noqa: E402
from distillkit.models import build_model  # noqa: E402
from distillkit.teachers.keys import BudgetStore, KeyStore  # noqa: E402
from distillkit.teachers.server import (  # noqa: E402
    ServerSettings,
    ServerThread,
    TeacherService,
    create_app,
)
from tests.test_server import META, call, images, npy  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("mlp", in_channels=1, num_classes=10, image_size=8)


def serve(model, tmp_path, keys: KeyStore | None = None, **kw):
    """A server in a thread; returns (server, key) (key None when keys are given)."""
    key = None
    if keys is None:
        keys = KeyStore()
        key = keys.add("alice")
    app = create_app(
        TeacherService(model, META), keys, BudgetStore(tmp_path / "s.db"), ServerSettings(**kw)
    )
    return ServerThread(app).start(), key


def test_revoked_or_added_key_takes_effect_without_restart(model, tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["teacher-keys", "add", "alice", "--keys", str(path)]) == 0
    alice = capsys.readouterr().out.strip()
    server, _ = serve(model, tmp_path, keys=KeyStore.load(path))
    try:
        assert call(server.url, "/v1/predict", alice, npy(images(2)))[0] == 200
        assert main(["teacher-keys", "revoke", alice.split("-")[1], "--keys", str(path)]) == 0
        assert call(server.url, "/v1/predict", alice, npy(images(2)))[0] == 401
        assert call(server.url, "/v1/info", alice)[0] == 401
        assert main(["teacher-keys", "add", "bob", "--keys", str(path)]) == 0
        bob = capsys.readouterr().out.strip().splitlines()[-1]
        assert call(server.url, "/v1/predict", bob, npy(images(2)))[0] == 200
        # a keys file that can no longer be read refuses every key rather than keeping old ones
        path.write_text("{not json")
        assert call(server.url, "/v1/info", bob)[0] == 401
    finally:
        server.stop()


def test_revoke_cli_errors_name_the_problem(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["teacher-keys", "add", "alice", "--keys", str(path)]) == 0
    key_id = capsys.readouterr().out.strip().split("-")[1]
    assert main(["teacher-keys", "revoke", "nosuchid", "--keys", str(path)]) == 2
    assert "nosuchid" in capsys.readouterr().err
    assert main(["teacher-keys", "revoke", "alice", "--keys", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err
    assert main(["teacher-keys", "revoke", "alice", "--keys", str(path)]) == 0  # by unique name
    assert main(["teacher-keys", "list", "--keys", str(path)]) == 0
    out = capsys.readouterr().out
    assert key_id in out and "revoked" in out
    assert KeyStore.load(path).records[key_id].sha256  # the record is kept, only marked


def test_keep_alive_requests_are_not_delayed_by_nagle(model, tmp_path):
    server, key = serve(model, tmp_path)
    body = npy(images(2))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy"}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        times = []
        for i in range(31):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/predict", body=body, headers=headers)
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
            if i:  # the first request also warms up the server's thread pool
                times.append(time.perf_counter() - t0)
    finally:
        conn.close()
        server.stop()
    # with Nagle's algorithm each answer waited for a delayed ACK: about 44 ms per request
    assert sum(times) / len(times) < 0.02, times


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_stalled_connections_are_closed(model, tmp_path):
    server, key = serve(model, tmp_path, read_timeout=0.5)
    try:
        idle = socket.create_connection((server.host, server.port))
        partial = socket.create_connection((server.host, server.port))
        partial.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: t\r\n")
        body = socket.create_connection((server.host, server.port))
        body.sendall(
            f"POST /v1/predict HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/x-npy\r\nContent-Length: 5000\r\n\r\n".encode()
            + b"\x93NUMPY"
        )
        for sock in (idle, partial, body):
            assert _closed_within(sock, 4.0)
            sock.close()
        assert call(server.url, "/v1/info", key)[1]["remaining"] is None
        assert call(server.url, "/v1/predict", key, npy(images(1)))[0] == 200
    finally:
        server.stop()


def test_concurrency_is_bounded(model, tmp_path):
    server, key = serve(model, tmp_path, max_connections=3, read_timeout=10)
    held = [socket.create_connection((server.host, server.port)) for _ in range(3)]
    try:
        time.sleep(0.2)
        status, _ = call(server.url, "/v1/info", key)
        assert status == 503
        for sock in held:
            sock.close()
        time.sleep(0.3)
        assert call(server.url, "/v1/info", key)[0] == 200
    finally:
        server.stop()


def test_failed_auth_flood_is_logged_in_aggregate(model, tmp_path, caplog):
    server, key = serve(model, tmp_path)
    try:
        with caplog.at_level(logging.INFO, logger="distillkit.serve.access"):
            for _ in range(60):
                call(server.url, "/v1/info", "dk-00000000-nope")
            call(server.url, "/v1/info", key)
            server.stop()
    finally:
        server.stop()
    rows = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "distillkit.serve.access"
    ]
    assert len(rows) <= 4, rows
    # nothing is lost: logged lines plus the counts of the ones folded into them
    denied = sum(r.get("status") == 401 for r in rows)
    folded = sum(r.get("suppressed", {}).get("401", 0) for r in rows)
    assert denied + folded == 60
    assert any(r.get("status") == 200 and r["key_id"] == key.split("-")[1] for r in rows)


def test_openapi_documents_body_auth_and_errors(model, tmp_path):
    server, _ = serve(model, tmp_path)
    try:
        status, doc = call(server.url, "/openapi.json")
    finally:
        server.stop()
    assert status == 200
    schemes = doc["components"]["securitySchemes"]
    bearer = [name for name, s in schemes.items() if s.get("scheme") == "bearer"]
    assert bearer
    op = doc["paths"]["/v1/predict"]["post"]
    assert {"application/json", "application/x-npy"} <= set(op["requestBody"]["content"])
    assert op["requestBody"]["content"]["application/json"]["schema"]
    assert op["security"] == [{bearer[0]: []}]
    assert {"400", "401", "413", "415", "422", "429"} <= set(op["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in op.get("parameters", []))
    assert doc["paths"]["/v1/info"]["get"]["security"] == [{bearer[0]: []}]


def test_random_bodies_never_get_a_5xx_nor_spend(model, tmp_path):
    server, key = serve(model, tmp_path, max_batch=4)
    rng = random.Random(0)
    good = npy(images(1))
    pieces = [b"[", b"]", b",", b"1e999", b"-0", b'"a"', b"true", b"null", b"{", b"}", b":"]
    bodies = [good[: rng.randrange(len(good))] for _ in range(20)]
    bodies += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(20)]
    bodies += [b'{"images":' + b"".join(rng.choices(pieces, k=40)) + b"}" for _ in range(40)]
    # a valid JSON batch with one pixel replaced by something that is not a number in range
    odd = [b"true", b'"0.5"', b"1" + b"0" * 400, b"[]", b"null", b"{}", b"-1e999", b"[" * 3000]
    pixels = json.dumps(images(1).tolist()).encode().split(b",")
    for literal in odd:
        at = rng.randrange(len(pixels))
        mutated = pixels[:at] + [pixels[at].rstrip(b"0123456789.e-") + literal] + pixels[at + 1 :]
        bodies.append(b'{"images":' + b",".join(mutated) + b"}")
    try:
        for i, body in enumerate(bodies):
            for ctype in ("application/json", "application/x-npy"):
                status, out = call(server.url, "/v1/predict", key, body, ctype)
                assert 400 <= status < 500, (i, ctype, body[:60], out)
        info = call(server.url, "/v1/info", key)[1]
        assert info["remaining"] is None
    finally:
        server.stop()
    assert BudgetStore(tmp_path / "s.db").spent(key.split("-")[1]) == 0


@pytest.mark.parametrize(
    "flag, value",
    [("--read-timeout", "0"), ("--max-connections", "-1"), ("--idempotency-ttl", "nan")],
)
def test_serve_teacher_rejects_bad_limits(tmp_path, capsys, flag, value):
    assert main(["serve-teacher", str(tmp_path / "none.pt"), flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and len(err.strip().splitlines()) == 1

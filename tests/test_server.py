"""Teacher server over real loopback HTTP: auth, budgets (concurrency, restart), bad input, CLI."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from distillkit.engine.checkpoint import save_checkpoint  # noqa: E402
from distillkit.models import build_model  # noqa: E402
from distillkit.teachers.keys import BudgetStore, KeyStore  # noqa: E402
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
    "dataset": "digits",
    "mean": [0.3],
    "std": [0.4],
    "classes": [str(i) for i in range(10)],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("mlp", in_channels=1, num_classes=10, image_size=8)


def start(model, state: Path, budget: int | None = 50, responses: str = "soft", **kw):
    """A server in a thread with two keys; returns (server, key_a, key_b)."""
    keys = KeyStore()
    key_a, key_b = keys.add("alice"), keys.add("bob", budget=5)
    service = TeacherService(model, META, responses)
    settings = ServerSettings(default_budget=budget, **kw)
    server = ServerThread(create_app(service, keys, BudgetStore(state), settings)).start()
    return server, key_a, key_b


def call(
    url: str,
    path: str,
    key: str | None = None,
    body: bytes | None = None,
    ctype: str = "application/x-npy",
):
    """(status, parsed JSON body) of one request."""
    headers = {"Content-Type": ctype} if body is not None else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        url + path, data=body, headers=headers, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:  # a non-JSON error body (a 500 from the framework) is a failure too
            return exc.code, {"error": {"code": None, "message": raw.decode("latin-1")}}


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def test_healthz_info_and_soft_predictions(model, tmp_path):
    server, key, _ = start(model, tmp_path / "s.db")
    try:
        assert call(server.url, "/healthz") == (200, {"status": "ok"})
        status, info = call(server.url, "/v1/info", key)
        assert status == 200
        assert info["input_shape"] == [1, 8, 8] and info["num_classes"] == 10
        assert info["responses"] == "soft" and info["remaining"] == 50
        x = images(4)
        status, out = call(server.url, "/v1/predict", key, npy(x))
        assert status == 200 and out["remaining"] == 46
        probs = np.asarray(out["probs"])
        with torch.no_grad():
            ref = torch.softmax(model((torch.from_numpy(x) - 0.3) / 0.4), 1).numpy()
        np.testing.assert_allclose(probs, ref, atol=2e-6)
        assert "logits" not in out
        # JSON input and uint8 input are accepted too
        status, out = call(
            server.url,
            "/v1/predict",
            key,
            json.dumps({"images": x.tolist()}).encode(),
            "application/json",
        )
        assert status == 200 and out["remaining"] == 42
        status, out = call(server.url, "/v1/predict", key, npy((x * 255).astype(np.uint8)))
        assert status == 200 and len(out["probs"]) == 4
    finally:
        server.stop()


@pytest.mark.parametrize("responses", ["hard", "topk:3"])
def test_hard_and_topk_reveal_only_that(model, tmp_path, responses):
    server, key, _ = start(model, tmp_path / "s.db", responses=responses)
    try:
        x = images(5)
        status, out = call(server.url, "/v1/predict", key, npy(x))
        assert status == 200
        with torch.no_grad():
            ref = torch.softmax(model((torch.from_numpy(x) - 0.3) / 0.4), 1)
        if responses == "hard":
            assert set(out) == {"responses", "labels", "remaining"}
            assert out["labels"] == ref.argmax(1).tolist()
        else:
            assert set(out) == {"responses", "k", "indices", "probs", "remaining"}
            assert np.asarray(out["indices"]).shape == (5, 3)
            assert out["indices"] == ref.topk(3, 1).indices.tolist()
    finally:
        server.stop()


def test_missing_or_wrong_key_is_401_without_hint(model, tmp_path):
    server, key, _ = start(model, tmp_path / "s.db")
    try:
        key_id = key.split("-")[1]
        wrong_secret = f"dk-{key_id}-{'x' * 43}"
        unknown_id = f"dk-00000000-{'x' * 43}"
        bodies = []
        for presented in (None, wrong_secret, unknown_id, "garbage", key + "x"):
            for path, body in (("/v1/info", None), ("/v1/predict", npy(images(2)))):
                status, out = call(server.url, path, presented, body)
                assert status == 401, (presented, path)
                bodies.append(out)
        # same answer for a wrong secret of a real key id and for an id that does not exist
        assert all(b == bodies[0] for b in bodies)
        req = urllib.request.Request(
            server.url + "/v1/info", headers={"Authorization": f"Basic {key}"}
        )
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=30)
        assert exc.value.code == 401
        assert call(server.url, "/v1/info", key)[1]["remaining"] == 50  # nothing was spent
    finally:
        server.stop()


def test_budget_exhaustion_is_429_with_remaining(model, tmp_path):
    server, key_a, key_b = start(model, tmp_path / "s.db", budget=10)
    try:
        assert call(server.url, "/v1/predict", key_a, npy(images(6)))[0] == 200
        status, out = call(server.url, "/v1/predict", key_a, npy(images(6)))
        assert status == 429 and out["error"]["remaining"] == 4
        assert call(server.url, "/v1/predict", key_a, npy(images(4)))[0] == 200
        status, out = call(server.url, "/v1/predict", key_a, npy(images(1)))
        assert status == 429 and out["error"]["remaining"] == 0
        # bob has his own budget of 5 in the keys file, untouched by alice's spending
        assert call(server.url, "/v1/info", key_b)[1]["remaining"] == 5
    finally:
        server.stop()


def test_concurrent_clients_never_overspend(model, tmp_path):
    budget, batch = 100, 7
    server, key, _ = start(model, tmp_path / "s.db", budget=budget)
    served, statuses, lock = [], [], threading.Lock()
    body = npy(images(batch))

    def client():
        while True:
            status, out = call(server.url, "/v1/predict", key, body)
            with lock:
                statuses.append(status)
                if status == 200:
                    served.append(len(out["probs"]))
            if status != 200:
                return

    try:
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        remaining = call(server.url, "/v1/info", key)[1]["remaining"]
    finally:
        server.stop()
    assert set(statuses) == {200, 429}
    assert sum(served) <= budget
    assert sum(served) == budget - remaining == batch * (budget // batch)
    assert BudgetStore(tmp_path / "s.db").spent(key.split("-")[1]) == sum(served)


def test_budget_survives_restart(model, tmp_path):
    state = tmp_path / "state.db"
    keys = KeyStore(tmp_path / "keys.json")
    key = keys.add("carol", budget=50)
    keys.save()
    service = TeacherService(model, META, "soft")

    def serve_once():
        app = create_app(service, KeyStore.load(tmp_path / "keys.json"), BudgetStore(state))
        return ServerThread(app).start()

    server = serve_once()
    assert call(server.url, "/v1/predict", key, npy(images(30)))[1]["remaining"] == 20
    server.stop()
    server = serve_once()
    try:
        assert call(server.url, "/v1/info", key)[1]["remaining"] == 20
        status, out = call(server.url, "/v1/predict", key, npy(images(25)))
        assert status == 429 and out["error"]["remaining"] == 20
    finally:
        server.stop()


def _json_images(*pixels: str) -> bytes:
    """A JSON body of shape (1, 1, 8, 8) whose pixels are the given JSON literals, then 0.5s."""
    values = (list(pixels) + ["0.5"] * 64)[:64]
    rows = ",".join("[" + ",".join(values[r * 8 : r * 8 + 8]) + "]" for r in range(8))
    return b'{"images": [[[' + rows.encode() + b"]]]}"


def _npy_header(descr: object, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header (no data) with any descr and shape."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _object_npy() -> bytes:
    return npy(np.array([{"a": 1}, None], dtype=object))


BAD_INPUTS = [
    ("wrong shape", npy(np.zeros((2, 1, 8, 7), np.float32)), "application/x-npy", 422, "bad_shape"),
    ("wrong ndim", npy(np.zeros((2, 64), np.float32)), "application/x-npy", 422, "bad_shape"),
    ("float64", npy(np.zeros((2, 1, 8, 8), np.float64)), "application/x-npy", 422, "bad_dtype"),
    ("int32", npy(np.zeros((2, 1, 8, 8), np.int32)), "application/x-npy", 422, "bad_dtype"),
    ("nan", npy(np.full((2, 1, 8, 8), np.nan, np.float32)), "application/x-npy", 422, "non_finite"),
    ("inf", npy(np.full((2, 1, 8, 8), np.inf, np.float32)), "application/x-npy", 422, "non_finite"),
    (
        "out of range",
        npy(np.full((2, 1, 8, 8), 3.0, np.float32)),
        "application/x-npy",
        422,
        "out_of_range",
    ),
    (
        "empty batch",
        npy(np.zeros((0, 1, 8, 8), np.float32)),
        "application/x-npy",
        422,
        "empty_batch",
    ),
    (
        "batch over max",
        npy(np.zeros((17, 1, 8, 8), np.float32)),
        "application/x-npy",
        422,
        "batch_too_large",
    ),
    (
        "pickle",
        pickle.dumps(np.zeros((2, 1, 8, 8), np.float32)),
        "application/x-npy",
        400,
        "pickle_refused",
    ),
    ("object npy", _object_npy(), "application/x-npy", 400, "pickle_refused"),
    ("not npy", b"hello world", "application/x-npy", 400, "not_npy"),
    (
        "truncated npy",
        npy(np.zeros((2, 1, 8, 8), np.float32))[:100],
        "application/x-npy",
        400,
        "bad_npy",
    ),
    (
        "body over limit",
        npy(np.zeros((100, 1, 8, 8), np.float32)),
        "application/x-npy",
        413,
        "body_too_large",
    ),
    ("malformed json", b'{"images": [[[', "application/json", 400, "malformed_json"),
    ("json without images", b'{"x": 1}', "application/json", 422, "missing_images"),
    ("ragged json", b'{"images": [[1, 2], [3]]}', "application/json", 422, "bad_images"),
    (
        "json NaN",
        json.dumps({"images": np.full((1, 1, 8, 8), np.nan).tolist()}).encode(),
        "application/json",
        422,
        "non_finite",
    ),
    ("text/plain", b"1,2,3", "text/plain", 415, "unsupported_media_type"),
    # an integer too large for a float, nesting deeper than the JSON parser's recursion limit
    (
        "json huge int",
        b'{"images":[[[[1' + b"0" * 400 + b"]]]]}",
        "application/json",
        422,
        "bad_shape",
    ),
    ("json huge pixel", _json_images("1" + "0" * 400), "application/json", 422, "non_finite"),
    ("json too deep", b"[" * 5000 + b"]" * 5000, "application/json", 400, "json_too_deep"),
    ("json strings", _json_images('"0.5"'), "application/json", 422, "bad_images"),
    ("json booleans", _json_images("true"), "application/json", 422, "bad_images"),
    (
        "json bool among numbers",
        _json_images("0.5", "false"),
        "application/json",
        422,
        "bad_images",
    ),
    ("json null", _json_images("null"), "application/json", 422, "bad_images"),
    ("json object pixel", _json_images("{}"), "application/json", 422, "bad_images"),
    ("json top-level list", b"[1, 2]", "application/json", 422, "missing_images"),
    ("json not utf-8", b'{"images": "\xff\xfe"}', "application/json", 400, "malformed_json"),
    # a .npy header promising far more data than the body holds: refused from the header alone
    (
        "npy huge shape",
        _npy_header("<f4", (1 << 40, 1, 8, 8)),
        "application/x-npy",
        422,
        "batch_too_large",
    ),
    (
        "npy short data",
        _npy_header("<f4", (2, 1, 8, 8)) + b"\0" * 16,
        "application/x-npy",
        400,
        "bad_npy",
    ),
    ("npy structured", _npy_header([("a", "<f4")], (2,)), "application/x-npy", 422, "bad_dtype"),
    (
        "npy bad header",
        b"\x93NUMPY\x01\x00\x10\x00{__import__('os')",
        "application/x-npy",
        400,
        "bad_npy",
    ),
]


INTERNAL_TEXT = re.compile(r"0x[0-9a-f]{6,}|Traceback|Unable to allocate|EOF in multi-line|<class ")


def test_bad_input_is_4xx_never_spends_and_server_keeps_serving(model, tmp_path):
    server, key, _ = start(
        model, tmp_path / "s.db", budget=1000, max_batch=16, max_body_bytes=20_000
    )
    good = npy(images(3))
    remaining = 1000
    try:
        for name, body, ctype, want_status, want_code in BAD_INPUTS:
            status, out = call(server.url, "/v1/predict", key, body, ctype)
            assert (status, out["error"]["code"]) == (want_status, want_code), name
            assert out["error"]["message"], name
            # messages are the server's own words, never an internal exception's text
            assert not INTERNAL_TEXT.search(out["error"]["message"]), (name, out)
            status, out = call(server.url, "/v1/predict", key, good)
            remaining -= 3
            assert status == 200 and out["remaining"] == remaining, name
    finally:
        server.stop()


def test_access_log_has_key_images_status_latency(model, tmp_path, caplog):
    server, key, _ = start(model, tmp_path / "s.db")
    try:
        with caplog.at_level(logging.INFO, logger="distillkit.serve.access"):
            call(server.url, "/v1/predict", key, npy(images(3)))
            call(server.url, "/v1/predict", "nope", npy(images(3)))
            server.stop()  # a line is written once its answer was delivered and charged
    finally:
        server.stop()
    rows = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "distillkit.serve.access"
    ]
    ok = next(r for r in rows if r["status"] == 200)
    assert ok["key_id"] == key.split("-")[1] and ok["images"] == 3 and ok["latency_ms"] >= 0
    denied = next(r for r in rows if r["status"] == 401)
    assert denied["key_id"] is None and denied["images"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_teacher_serves_and_shuts_down_gracefully(model, tmp_path, capsys):
    ckpt = tmp_path / "teacher.pt"
    save_checkpoint(
        {"model": model.state_dict(), "model_meta": META, "epoch": 1, "config": {}}, ckpt
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    keys = tmp_path / "keys.json"
    from distillkit.cli import main

    assert main(["teacher-keys", "add", "ci", "--keys", str(keys)]) == 0
    key = capsys.readouterr().out.strip()
    assert "sha256" in keys.read_text() and key not in keys.read_text()  # stored hashed only
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distillkit",
            "serve-teacher",
            str(ckpt),
            "--port",
            str(port),
            "--keys",
            str(keys),
            "--state",
            str(tmp_path / "s.db"),
            "--budget",
            "20",
            "--responses",
            "hard",
            "--read-timeout",
            "5",
            "--max-connections",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call(url, "/healthz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        status, out = call(url, "/v1/predict", key, npy(images(4)))
        assert status == 200 and len(out["labels"]) == 4 and out["remaining"] == 16
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(
        r["path"] == "/v1/predict" and r["images"] == 4 and r["status"] == 200 for r in lines
    )
    assert "budget database closed" in err

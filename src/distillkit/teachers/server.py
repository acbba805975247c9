"""Serve a trained model as a black-box teacher over HTTP (FastAPI + uvicorn, extra `serve`).

Protocol (all bodies JSON unless said otherwise; errors are ``{"error": {"code", "message"}}``):

- ``POST /v1/predict`` with ``Authorization: Bearer KEY``. The body is either ``.npy`` bytes
  (``Content-Type: application/x-npy`` or ``application/octet-stream``; read with
  ``allow_pickle=False``) or JSON ``{"images": [[[[...]]]]}``. Images are (N, C, H, W), float32 in
  [0, 1] or uint8 in [0, 255], in *pixel* space: the server applies its model's own normalisation.
  Answers ``{"responses": "soft", "probs": [[...]]}`` (probabilities rounded to 6 decimals),
  ``{"responses": "topk", "k": K, "indices": [[...]], "probs": [[...]]}`` or
  ``{"responses": "hard", "labels": [...]}``, plus ``"remaining"`` (this key's budget after the
  call, null when unlimited). Logits are never returned.
- ``GET /v1/info`` (authenticated): input shape, dtypes, classes, response kind, max batch, and
  this key's budget and remaining count.
- ``GET /healthz``: liveness, no key needed.

Every request passes, in order: authentication (401, the same body for a missing, malformed or
unknown key), the body size limit (413), decoding and validation (400/415/422, each naming the
problem), then the budget, reserved atomically per image before inference (429 with the remaining
count when the batch does not fit; a batch is served whole or not at all) and refunded if inference
fails. Bad input is therefore never charged. Each request writes one JSON line to the
``distillkit.serve.access`` logger (key id, images, status, latency). uvicorn handles SIGINT/
SIGTERM gracefully: it stops accepting connections, lets in-flight requests finish, then the
lifespan hook closes the budget database.
"""

# no `from __future__ import annotations`: FastAPI resolves the handlers' `Request` annotation
# at runtime, and Request is imported inside create_app so the core install needs no FastAPI
import io
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distillkit.teachers.keys import BudgetStore, KeyRecord, KeyStore

ACCESS_LOGGER = "distillkit.serve.access"
NPY_MAGIC = b"\x93NUMPY"
NPY_TYPES = ("application/x-npy", "application/octet-stream", "application/npy")
log = logging.getLogger("distillkit.serve")
access_log = logging.getLogger(ACCESS_LOGGER)


class ApiError(Exception):
    """A client error with its HTTP status, a stable code and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def parse_responses(text: str) -> tuple[str, int | None]:
    """'soft' | 'hard' | 'topk:K' -> (kind, k)."""
    if text in ("soft", "hard"):
        return text, None
    if text.startswith("topk:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "topk", k
    raise ValueError(f"--responses must be soft, hard or topk:K with K >= 1, got {text!r}")


class TeacherService:
    """The framework-free core: validates arrays and answers them with the configured responses."""

    def __init__(
        self,
        model: nn.Module,
        meta: dict[str, Any],
        responses: str = "soft",
        device: str | torch.device = "cpu",
    ):
        self.kind, self.k = parse_responses(responses)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.meta = meta
        self.num_classes = int(meta["num_classes"])
        if self.k is not None and self.k > self.num_classes:
            raise ValueError(
                f"topk:{self.k} asks for more classes than the model has ({self.num_classes})"
            )
        size = int(meta["image_size"])
        self.input_shape = (int(meta["in_channels"]), size, size)
        self.classes = [str(c) for c in meta.get("classes", range(self.num_classes))]
        self._mean = torch.tensor(meta["mean"], dtype=torch.float32).reshape(1, -1, 1, 1)
        self._std = torch.tensor(meta["std"], dtype=torch.float32).reshape(1, -1, 1, 1)
        # one forward at a time: the host's cores are better used by one batch than by contention
        self._lock = threading.Lock()

    @property
    def responses(self) -> str:
        """The configured response kind as given on the command line."""
        return f"topk:{self.k}" if self.kind == "topk" else self.kind

    def validate(self, arr: np.ndarray, max_batch: int) -> np.ndarray:
        """Float32 images in [0, 1] from a decoded array, or ApiError naming what is wrong."""
        if arr.dtype not in (np.float32, np.uint8):
            raise ApiError(
                422,
                "bad_dtype",
                f"images must be float32 in [0, 1] or uint8, got dtype {arr.dtype}",
            )
        want = self.input_shape
        if arr.ndim != 4 or tuple(arr.shape[1:]) != want:
            raise ApiError(
                422,
                "bad_shape",
                f"images must have shape (N, {want[0]}, {want[1]}, {want[2]}), got {tuple(arr.shape)}",
            )
        n = arr.shape[0]
        if n == 0:
            raise ApiError(422, "empty_batch", "the batch holds no images")
        if n > max_batch:
            raise ApiError(
                422, "batch_too_large", f"batch of {n} images exceeds max_batch {max_batch}"
            )
        if arr.dtype == np.uint8:
            return arr.astype(np.float32) / 255.0
        if not np.isfinite(arr).all():
            raise ApiError(422, "non_finite", "images contain NaN or infinite values")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ApiError(
                422,
                "out_of_range",
                f"float images must lie in [0, 1], got values in [{arr.min():.4g}, {arr.max():.4g}]",
            )
        return arr

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> dict[str, Any]:
        """The response payload for validated float32 images in [0, 1]."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = (x - self._mean.to(self.device)) / self._std.to(self.device)
        with self._lock:
            logits = self.model(x).float()
        probs = torch.softmax(logits, dim=1).cpu()
        if self.kind == "hard":
            return {"responses": "hard", "labels": probs.argmax(1).tolist()}
        if self.kind == "topk":
            top = probs.topk(self.k, dim=1)
            return {
                "responses": "topk",
                "k": self.k,
                "indices": top.indices.tolist(),
                "probs": np.round(top.values.numpy(), 6).tolist(),
            }
        return {"responses": "soft", "probs": np.round(probs.numpy(), 6).tolist()}

    def info(self) -> dict[str, Any]:
        """What a client needs to know to query this teacher."""
        return {
            "input_shape": list(self.input_shape),
            "input_dtypes": ["float32", "uint8"],
            "input_range": [0.0, 1.0],
            "num_classes": self.num_classes,
            "classes": self.classes,
            "responses": self.kind,
            "k": self.k,
        }


def decode_images(body: bytes, content_type: str) -> np.ndarray:
    """The array inside a request body (.npy or JSON); ApiError for anything else."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(
                400, "malformed_json", f"request body is not valid JSON: {exc}"
            ) from None
        if not isinstance(data, dict) or "images" not in data:
            raise ApiError(422, "missing_images", 'JSON body must be an object with key "images"')
        try:
            arr = np.asarray(data["images"], dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise ApiError(
                422, "bad_images", f'"images" must be a rectangular array of numbers: {exc}'
            ) from None
        return arr
    if ctype in NPY_TYPES:
        if not body.startswith(NPY_MAGIC):
            if body[:1] == b"\x80":
                raise ApiError(400, "pickle_refused", "pickle payloads are refused; send .npy")
            raise ApiError(400, "not_npy", "body is not a .npy file (bad magic bytes)")
        try:
            return np.lib.format.read_array(io.BytesIO(body), allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc).lower():
                raise ApiError(
                    400, "pickle_refused", "object arrays (pickle) are refused; send a numeric .npy"
                ) from None
            raise ApiError(400, "bad_npy", f"could not read the .npy body: {exc}") from None
        except Exception as exc:  # truncated headers raise several types
            raise ApiError(400, "bad_npy", f"could not read the .npy body: {exc}") from None
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type must be application/x-npy or application/json, got {ctype or 'none'!r}",
    )


@dataclass
class ServerSettings:
    """Limits and budgets of one server."""

    max_batch: int = 256
    max_body_bytes: int | None = None  # default: room for a max batch as JSON
    default_budget: int | None = None  # for keys without a budget of their own; None: unlimited
    extra_info: dict[str, Any] = field(default_factory=dict)


def default_body_limit(input_shape: Sequence[int], max_batch: int) -> int:
    """Bytes a max batch needs as JSON (about 12 characters per value) plus headroom."""
    return 12 * max_batch * math.prod(input_shape) + (1 << 16)


def _error(exc: ApiError, headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    body = {"error": {"code": exc.code, "message": exc.message, **exc.extra}}
    return JSONResponse(body, status_code=exc.status, headers=headers)


UNAUTHORIZED = ApiError(401, "unauthorized", "missing or invalid API key")


def create_app(
    service: TeacherService,
    keys: KeyStore,
    budgets: BudgetStore,
    settings: ServerSettings | None = None,
):
    """The FastAPI application serving `service` to holders of `keys`, charging `budgets`."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    settings = settings or ServerSettings()
    limit = settings.max_body_bytes or default_body_limit(service.input_shape, settings.max_batch)

    @asynccontextmanager
    async def lifespan(app):
        log.info(
            "teacher server up: responses=%s max_batch=%d", service.responses, settings.max_batch
        )
        yield
        budgets.close()
        log.info("teacher server stopped; budget database closed")

    app = FastAPI(title="distillkit teacher", lifespan=lifespan, docs_url=None, redoc_url=None)

    def budget_of(record: KeyRecord) -> int | None:
        return record.budget if record.budget is not None else settings.default_budget

    def authenticate(request: Request) -> KeyRecord:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        record = keys.verify(token.strip() if scheme.lower() == "bearer" else None)
        if record is None:
            raise UNAUTHORIZED
        request.state.key_id = record.id
        return record

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _drain(request, limit)
            raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                await _drain(request, limit)
                raise ApiError(413, "body_too_large", f"body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.middleware("http")
    async def access(request: Request, call_next):
        t0 = time.perf_counter()
        request.state.key_id = None
        request.state.images = 0
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            access_log.info(
                json.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "method": request.method,
                        "path": request.url.path,
                        "key_id": request.state.key_id,
                        "images": request.state.images,
                        "status": status,
                        "latency_ms": round(1000 * (time.perf_counter() - t0), 2),
                    }
                )
            )

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info(request: Request):
        try:
            record = authenticate(request)
        except ApiError as exc:
            return _error(exc, {"WWW-Authenticate": "Bearer"})
        budget = budget_of(record)
        remaining = await anyio.to_thread.run_sync(budgets.remaining, record.id, budget)
        return {
            **service.info(),
            "max_batch": settings.max_batch,
            "max_body_bytes": limit,
            "key_id": record.id,
            "budget": budget,
            "remaining": remaining,
            **settings.extra_info,
        }

    @app.post("/v1/predict")
    async def predict(request: Request):
        try:
            record = authenticate(request)
        except ApiError as exc:
            return _error(exc, {"WWW-Authenticate": "Bearer"})
        try:
            body = await read_body(request)
            arr = decode_images(body, request.headers.get("content-type", ""))
            images = service.validate(arr, settings.max_batch)
        except ApiError as exc:
            return _error(exc)
        n = int(images.shape[0])
        budget = budget_of(record)
        granted, remaining = await anyio.to_thread.run_sync(budgets.reserve, record.id, n, budget)
        if not granted:
            return _error(
                ApiError(
                    429,
                    "budget_exhausted",
                    f"query budget exhausted: {remaining} images remain, the batch has {n}",
                    remaining=remaining,
                ),
                {"X-Budget-Remaining": str(remaining)},
            )
        try:
            payload = await anyio.to_thread.run_sync(service.predict, images)
        except Exception:
            await anyio.to_thread.run_sync(budgets.refund, record.id, n)
            log.exception("inference failed; budget refunded")
            return JSONResponse(
                {"error": {"code": "internal", "message": "inference failed; nothing was charged"}},
                status_code=500,
            )
        request.state.images = n
        payload["remaining"] = remaining
        headers = {"X-Budget-Remaining": str(remaining)} if remaining is not None else None
        return JSONResponse(payload, headers=headers)

    return app


async def _drain(request, limit: int) -> None:
    """Read and drop an oversized body (bounded) so the client sees the 413, not a reset."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > 8 * limit + (8 << 20):
                break
    except Exception:
        pass


def load_service(path: str | Path, responses: str = "soft", device: str = "cpu") -> TeacherService:
    """A TeacherService for the best checkpoint of a run directory (or a checkpoint file)."""
    from distillkit.engine.checkpoint import model_from_checkpoint

    model, state = model_from_checkpoint(path, which="best")
    return TeacherService(model, state["model_meta"], responses, device)


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket (port 0: a free port, read back from getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, benchmarks); stop() shuts down."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "ServerThread":
        """Start and wait until the server accepts requests."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("teacher server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful shutdown: finish in-flight requests, run the lifespan's shutdown."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    target: str | Path,
    responses: str = "soft",
    host: str = "127.0.0.1",
    port: int = 8000,
    keys_file: str | Path = "teacher_keys.json",
    budget: int | None = None,
    max_batch: int = 256,
    state: str | Path = "teacher_state.db",
    device: str = "cpu",
    max_body_bytes: int | None = None,
) -> None:
    """Load a trained model and serve it until SIGINT/SIGTERM (graceful)."""
    import uvicorn

    service = load_service(target, responses, device)
    keys = KeyStore.load(keys_file)
    if not keys.records:
        raise ValueError(
            f"keys file {keys_file} holds no keys; add one with `distillkit teacher-keys add`"
        )
    budgets = BudgetStore(state)
    settings = ServerSettings(max_batch, max_body_bytes, budget)
    app = create_app(service, keys, budgets, settings)
    sock = bind_socket(host, port)
    log.info("serving %s on http://%s:%d", target, *sock.getsockname()[:2])
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=10
    )
    uvicorn.Server(config).run(sockets=[sock])

"""Serve a trained model as a black-box teacher over HTTP (FastAPI + uvicorn, extra `serve`).

Protocol (all bodies JSON unless said otherwise; errors are ``{"error": {"code", "message"}}``
with a fixed, server-written message; the schema is at ``GET /openapi.json``):

- ``POST /v1/predict`` with ``Authorization: Bearer KEY``. The body is either ``.npy`` bytes
  (``Content-Type: application/x-npy`` or ``application/octet-stream``; no pickle; the header is
  checked before any data is read) or JSON ``{"images": [[[[...]]]]}`` of numbers only. Images are
  (N, C, H, W), float32 in [0, 1] or uint8 in [0, 255], in *pixel* space: the server applies its
  model's own normalisation. Answers ``{"responses": "soft", "probs": [[...]]}`` (probabilities
  rounded to 6 decimals), ``{"responses": "topk", "k": K, "indices": [[...]], "probs": [[...]]}``
  or ``{"responses": "hard", "labels": [...]}``, plus ``"remaining"`` (this key's budget after the
  call, null when unlimited). Logits are never returned. An optional ``Idempotency-Key`` header
  (1-128 of ``[A-Za-z0-9_-]``) makes retries free: the same key and body within the TTL get the
  stored answer (header ``Idempotent-Replayed: true``), another body gets 422, a repeat while the
  first still runs waits for it.
- ``GET /v1/info`` (authenticated): input shape, dtypes, classes, response kind, max batch, and
  this key's budget and remaining count.
- ``GET /healthz``: liveness, no key needed.

Every request passes, in order: authentication (401, the same body for a missing, malformed,
unknown or revoked key; the keys file is re-read when it changes), the body size limit (413),
decoding and validation (400/415/422, each naming the problem), the idempotency check, then the
budget: the batch's images are *reserved* atomically (429 with the remaining count when they do not
fit; a batch is served whole or not at all). The charge follows delivery: the reservation is
committed only after the answer was handed to the connection while the client was still there, and
released when the client left before (checked before the status line and before the body), when
inference failed, or when the server was killed (released by the next start). Bad input is
therefore never charged. Each authenticated request writes one JSON line to the
``distillkit.serve.access`` logger (key id, images charged, status, latency; status 499 when the
client left before an answer); requests without a valid key are sampled (one line per interval,
with counts of those left out). Connections get TCP_NODELAY, a deadline for sending each request
(``read_timeout``), uvicorn's keep-alive timeout and a cap on concurrent connections (503 above).
uvicorn handles SIGINT/SIGTERM gracefully: it stops accepting connections, lets in-flight requests
finish, then the lifespan hook closes the budget database.
"""

# no `from __future__ import annotations`: FastAPI resolves the handlers' `Request` annotation
# at runtime, and Request is imported inside create_app so the core install needs no FastAPI
import functools
import hashlib
import json
import logging
import math
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distillkit.teachers.keys import BudgetStore, KeyRecord, KeyStore
from distillkit.teachers.server_http import (
    IDEMPOTENCY_PARAMETER,
    PREDICT_BODY,
    AccessLog,
    ApiError,
    SampledLog,
    add_bearer_scheme,
    bind_socket,
    client_gone,
    decode_images,
    drain,
    error_body,
    error_responses,
    parse_idempotency_key,
    uvicorn_config,
)
from distillkit.teachers.server_store import Claim

log = logging.getLogger("distillkit.serve")
access_log = logging.getLogger("distillkit.serve.access")


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
        self.model = model.to(self.device).eval().requires_grad_(False)
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

    def check_header(self, shape: tuple[int, ...], dtype: np.dtype, max_batch: int) -> None:
        """Refuse a batch by its dtype and shape alone (ApiError naming what is wrong)."""
        if dtype not in (np.float32, np.uint8):
            raise ApiError(
                422,
                "bad_dtype",
                f"images must be float32 in [0, 1] or uint8, got dtype {str(dtype)[:40]}",
            )
        want = self.input_shape
        if len(shape) != 4 or tuple(shape[1:]) != want:
            got = str(tuple(shape)) if len(shape) <= 8 else f"{len(shape)} dimensions"
            raise ApiError(
                422,
                "bad_shape",
                f"images must have shape (N, {want[0]}, {want[1]}, {want[2]}), got {got}",
            )
        n = shape[0]
        if n == 0:
            raise ApiError(422, "empty_batch", "the batch holds no images")
        if n > max_batch:
            raise ApiError(
                422, "batch_too_large", f"batch of {n} images exceeds max_batch {max_batch}"
            )

    def validate(self, arr: np.ndarray, max_batch: int) -> np.ndarray:
        """Float32 images in [0, 1] from a decoded array, or ApiError naming what is wrong."""
        self.check_header(tuple(arr.shape), arr.dtype, max_batch)
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


@dataclass
class ServerSettings:
    """Limits, budgets and timeouts of one server."""

    max_batch: int = 256
    max_body_bytes: int | None = None  # default: room for a max batch as JSON
    default_budget: int | None = None  # for keys without a budget of their own; None: unlimited
    extra_info: dict[str, Any] = field(default_factory=dict)
    idempotency_ttl: float = 86400.0  # seconds an answer stays replayable under its key
    idempotency_wait: float = 30.0  # how long a duplicate waits for the first to finish
    read_timeout: float = 30.0  # seconds to receive one whole request (headers and body)
    keep_alive_timeout: int = 5  # seconds an idle kept-alive connection stays open
    max_connections: int | None = 64  # concurrent connections/requests; 503 above
    log_interval: float = 10.0  # one access-log line per interval for requests without a key


def _error(exc: ApiError, headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


UNAUTHORIZED = ApiError(401, "unauthorized", "missing or invalid API key")
INTERNAL = ApiError(500, "internal", "the server failed to answer; nothing was charged")
SECURED = {"security": [{"bearerKey": []}]}
BEARER = {"WWW-Authenticate": "Bearer"}
# idempotency outcomes answered with an error: (status, code, what the key did)
CONFLICTS = {
    "mismatch": (422, "idempotency_key_reused", "was already used with another body"),
    "in_progress": (409, "idempotency_in_progress", "belongs to a running request"),
}


def create_app(
    service: TeacherService,
    keys: KeyStore,
    budgets: BudgetStore,
    settings: ServerSettings | None = None,
):
    """The FastAPI application serving `service` to holders of `keys`, charging `budgets`."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    settings = settings or ServerSettings()
    # by default the bytes a max batch needs as JSON (about 12 characters per value) plus headroom
    json_batch = 12 * settings.max_batch * math.prod(service.input_shape) + (1 << 16)
    limit = settings.max_body_bytes or json_batch
    budgets.reply_ttl = settings.idempotency_ttl
    sampled = SampledLog(access_log, settings.log_interval)

    @asynccontextmanager
    async def lifespan(app):
        log.info(
            "teacher server up: responses=%s max_batch=%d", service.responses, settings.max_batch
        )
        yield
        sampled.flush()
        budgets.close()
        log.info("teacher server stopped; budget database closed")

    app = FastAPI(title="distillkit teacher", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    add_bearer_scheme(app)
    app.add_middleware(AccessLog, sampled=sampled)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(ApiError(exc.status_code, code, str(exc.detail)[:200]), exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error(INTERNAL)

    def authenticate(request: Request) -> tuple[KeyRecord, int | None] | None:
        """The bearer key's record and budget; None for a missing or invalid key."""
        keys.refresh()
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        record = keys.verify(token.strip() if scheme.lower() == "bearer" else None)
        if record is None:
            return None
        request.state.key_id = record.id
        return record, record.budget if record.budget is not None else settings.default_budget

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            await drain(request, limit)
            raise ApiError(
                413, "body_too_large", f"body of {declared[:20]} bytes exceeds {limit} bytes"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                await drain(request, limit)
                raise ApiError(413, "body_too_large", f"body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def answer(images: np.ndarray, outcome: Claim) -> bytes | None:
        """The JSON answer for a reserved batch; None (reservation released) if inference fails."""
        try:
            payload = service.predict(images)
            payload["remaining"] = outcome.remaining
            return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        except Exception:
            budgets.release(outcome.reservation)
            log.exception("inference failed; nothing was charged")
            return None

    check = functools.partial(service.check_header, max_batch=settings.max_batch)

    def admit(body: bytes, content_type: str, key_id: str, budget: int | None, scoped):
        """Decode, validate, claim the budget and, when reserved, answer: one worker-thread hop."""
        images = service.validate(decode_images(body, content_type, check), settings.max_batch)
        fingerprint = hashlib.sha256(body).hexdigest() if scoped is not None else None
        outcome = budgets.begin(key_id, len(images), budget, scoped, fingerprint)
        content = answer(images, outcome) if outcome.status == "reserved" else None
        return images, fingerprint, outcome, content

    async def claim(request: Request, key_id: str, n: int, budget, idem, fingerprint):
        """The budget/idempotency outcome; a duplicate of a running request waits for it."""
        deadline, delay = time.monotonic() + settings.idempotency_wait, 0.01
        while True:
            outcome = await anyio.to_thread.run_sync(
                budgets.begin, key_id, n, budget, idem, fingerprint
            )
            if outcome.status != "in_progress" or time.monotonic() > deadline:
                return outcome
            if await client_gone(request.receive):
                return None
            await anyio.sleep(delay)
            delay = min(0.2, 2 * delay)

    async def settle(reservation: str, delivered: bool, reply: bytes) -> bool:
        """Commit (delivered) or release a reservation, even while being cancelled."""
        with anyio.CancelScope(shield=True):
            try:
                if delivered:
                    return await anyio.to_thread.run_sync(budgets.commit, reservation, reply)
                await anyio.to_thread.run_sync(budgets.release, reservation)
            except Exception:
                log.exception(
                    "could not settle reservation %s (delivered=%s)", reservation, delivered
                )
        return False

    class Delivered(Response):
        """The answer; its reservation is charged only if the client was there to receive it."""

        media_type = "application/json"

        def __init__(self, content: bytes, headers: dict[str, str], reservation: str, n: int):
            super().__init__(content, 200, headers)
            self.reservation, self.n = reservation, n

        async def __call__(self, scope, receive, send) -> None:
            delivered = False
            try:
                if not await client_gone(receive):
                    start = {"type": "http.response.start", "status": 200}
                    await send({**start, "headers": self.raw_headers})
                    if not await client_gone(receive):
                        await send({"type": "http.response.body", "body": self.body})
                        delivered = True
            finally:
                if await settle(self.reservation, delivered, self.body):
                    scope.setdefault("state", {})["images"] = self.n

    class Gone(Response):
        """Nothing to send: the client left (logged as 499)."""

        async def __call__(self, scope, receive, send) -> None:
            return None

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/info", openapi_extra=SECURED, responses=error_responses("401", "503"))
    async def info(request: Request):
        if (auth := authenticate(request)) is None:
            return _error(UNAUTHORIZED, BEARER)
        record, budget = auth
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

    @app.post(
        "/v1/predict",
        openapi_extra={
            **SECURED,
            "requestBody": PREDICT_BODY,
            "parameters": [IDEMPOTENCY_PARAMETER],
        },
        responses=error_responses("400", "401", "409", "413", "415", "422", "429", "503"),
    )
    async def predict(request: Request):
        if (auth := authenticate(request)) is None:
            return _error(UNAUTHORIZED, BEARER)
        record, budget = auth
        try:
            idem = parse_idempotency_key(request.headers.get("idempotency-key"))
            scoped = f"{service.responses}:{idem}" if idem is not None else None
            body = await read_body(request)
            ctype = request.headers.get("content-type", "")
            images, fingerprint, outcome, content = await anyio.to_thread.run_sync(
                admit, body, ctype, record.id, budget, scoped
            )
        except ApiError as exc:
            return _error(exc)
        except ClientDisconnect:
            return Gone()
        n = len(images)
        if outcome.status == "in_progress":  # a duplicate: wait for the first to finish
            outcome = await claim(request, record.id, n, budget, scoped, fingerprint)
            if outcome is None:
                return Gone()
            if outcome.status == "reserved":
                if await client_gone(request.receive):
                    await settle(outcome.reservation, False, b"")
                    return Gone()
                content = await anyio.to_thread.run_sync(answer, images, outcome)
        if outcome.status == "replay":
            return Response(outcome.body, 200, {"Idempotent-Replayed": "true"}, "application/json")
        if outcome.status in CONFLICTS:
            status, code, what = CONFLICTS[outcome.status]
            return _error(ApiError(status, code, f"Idempotency-Key {idem!r} {what}"))
        remaining = outcome.remaining  # None only for an unlimited key, which is never refused
        headers = {"X-Budget-Remaining": str(remaining)} if remaining is not None else {}
        if outcome.status == "refused":
            text = f"query budget exhausted: {remaining} images remain, the batch has {n}"
            return _error(ApiError(429, "budget_exhausted", text, remaining=remaining), headers)
        if content is None:  # inference failed and its reservation was released
            return _error(INTERNAL)
        return Delivered(content, headers, outcome.reservation, n)

    return app


def load_service(path: str | Path, responses: str = "soft", device: str = "cpu") -> TeacherService:
    """A TeacherService for the best checkpoint of a run directory (or a checkpoint file)."""
    from distillkit.models.checkpoint import model_from_checkpoint

    model, state = model_from_checkpoint(path, which="best")
    return TeacherService(model, state["model_meta"], responses, device)


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, benchmarks); stop() shuts down."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        settings = getattr(app.state, "settings", None) or ServerSettings()
        self.server = uvicorn.Server(uvicorn_config(app, settings))
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
    state: str | Path = "teacher_state.db",
    device: str = "cpu",
    settings: ServerSettings | None = None,
) -> None:
    """Load a trained model and serve it with `settings`' limits until SIGINT/SIGTERM (graceful)."""
    import uvicorn

    service = load_service(target, responses, device)
    keys = KeyStore.load(keys_file)
    if not any(r.revoked is None for r in keys.records.values()):
        raise ValueError(
            f"keys file {keys_file} holds no active keys; add one with `distillkit teacher-keys add`"
        )
    settings = settings or ServerSettings()
    budgets = BudgetStore(state, reply_ttl=settings.idempotency_ttl)
    app = create_app(service, keys, budgets, settings)
    sock = bind_socket(host, port)
    log.info("serving %s on http://%s:%d", target, *sock.getsockname()[:2])
    uvicorn.Server(uvicorn_config(app, settings, graceful=10)).run(sockets=[sock])

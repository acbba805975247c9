"""Transport-side pieces of the teacher server: body decoding, connection guards, logs, API docs.

Everything here treats the request as hostile: decoding never raises anything but `ApiError`
(with a fixed, server-written message), a `.npy` header is checked before any data is read, and
connections that stall are closed. FastAPI, uvicorn and h11 are imported inside functions so that
the core install (without the `serve` extra) can import this module.
"""

from __future__ import annotations

import io
import json
import logging
import math
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
NPY_TYPES = ("application/x-npy", "application/octet-stream", "application/npy")
IDEMPOTENCY_KEY_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
)
IDEMPOTENCY_KEY_MAX = 128
# JSON names of the Python types a parsed pixel may have that are not numbers
_NOT_NUMBERS = {bool: "true/false", str: "strings", type(None): "null", dict: "objects"}


class ApiError(Exception):
    """A client error with its HTTP status, a stable code and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


HeaderCheck = Callable[[tuple[int, ...], np.dtype], None]


def decode_images(body: bytes, content_type: str, check: HeaderCheck | None = None) -> np.ndarray:
    """The array inside a request body (.npy or JSON); ApiError for anything else.

    `check(shape, dtype)` runs on a .npy header before its data is read, so a header that
    promises a huge or wrong array is refused without allocating it.
    """
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return _decode_json(body)
    if ctype in NPY_TYPES:
        return _decode_npy(body, check)
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type must be application/x-npy or application/json, got {ctype[:60] or 'none'!r}",
    )


def _decode_json(body: bytes) -> np.ndarray:
    try:
        # integers as floats: an integer too large for a float becomes inf (refused as
        # non-finite) instead of an OverflowError
        data = json.loads(body, parse_int=float)
    except RecursionError:
        raise ApiError(
            400, "json_too_deep", "JSON nesting is too deep (images are 4 nested arrays)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            "malformed_json",
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "malformed_json", "request body is not valid UTF-8 JSON") from None
    if not isinstance(data, dict) or "images" not in data:
        raise ApiError(422, "missing_images", 'JSON body must be an object with key "images"')
    try:
        obj = np.array(data["images"], dtype=object)
    except (ValueError, TypeError, RecursionError):
        raise ApiError(
            422, "bad_images", '"images" must be a rectangular array of numbers (ragged nesting)'
        ) from None
    kinds = set(map(type, obj.flat)) - {float}
    if kinds:
        found = sorted({_NOT_NUMBERS.get(k, "nested arrays of unequal length") for k in kinds})
        raise ApiError(
            422,
            "bad_images",
            f'"images" must be a rectangular array of numbers; found {", ".join(found)}',
        )
    with np.errstate(over="ignore", invalid="ignore"):
        return obj.astype(np.float64).astype(np.float32)


def _decode_npy(body: bytes, check: HeaderCheck | None) -> np.ndarray:
    if not body.startswith(NPY_MAGIC):
        if body[:1] == b"\x80":
            raise ApiError(400, "pickle_refused", "pickle payloads are refused; send .npy")
        raise ApiError(400, "not_npy", "body is not a .npy file (bad magic bytes)")
    fmt = np.lib.format
    fp = io.BytesIO(body)
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise ApiError(400, "bad_npy", f".npy format version {version} is not supported")
    except ApiError:
        raise
    except Exception:  # the header parser raises several types; none of their text is shown
        raise ApiError(400, "bad_npy", "the .npy header is malformed or truncated") from None
    if dtype.hasobject:
        raise ApiError(
            400, "pickle_refused", "object arrays (pickle) are refused; send a numeric .npy"
        )
    if check is not None:
        check(tuple(shape), dtype)
    count = math.prod(shape)
    need, have = count * dtype.itemsize, len(body) - fp.tell()
    if have < need:
        raise ApiError(
            400,
            "bad_npy",
            f"the .npy body is truncated: its header promises {need} data bytes, it holds {have}",
        )
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=fp.tell())
    arr = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    return np.array(arr)  # a writable copy that owns its memory


def parse_idempotency_key(value: str | None) -> str | None:
    """The Idempotency-Key header's value, None when absent; ApiError when malformed."""
    if value is None:
        return None
    if not 1 <= len(value) <= IDEMPOTENCY_KEY_MAX or not set(value) <= IDEMPOTENCY_KEY_CHARS:
        raise ApiError(
            400,
            "bad_idempotency_key",
            f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters of A-Z a-z 0-9 _ -",
        )
    return value


def error_body(exc: ApiError) -> dict[str, Any]:
    """The JSON error body of an ApiError."""
    return {"error": {"code": exc.code, "message": exc.message, **exc.extra}}


async def client_gone(receive: Callable) -> bool:
    """Whether the ASGI server reports the client disconnected (never waits)."""
    import anyio

    message: dict[str, Any] = {}
    with anyio.CancelScope() as scope:
        scope.cancel()  # take a message only if one is already there
        message = await receive()
    return message.get("type") == "http.disconnect"


def guarded_protocol(read_timeout: float) -> type:
    """uvicorn's h11 protocol with TCP_NODELAY and a deadline for receiving each request.

    The deadline starts when a connection opens or when the first byte of a request arrives and
    ends when the whole request (headers and body) is in; a connection that misses it is closed.
    Between requests uvicorn's keep-alive timeout applies.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        """H11Protocol that disables Nagle's algorithm and times out slow request reads."""

        _deadline: Any = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                try:  # small responses must not wait for the client's delayed ACK
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                self._arm()  # a request (or its body) is still coming: keep the first deadline
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._disarm()  # idle until the next request: uvicorn's keep-alive timer
            super().on_response_complete()

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _read_timed_out(self) -> None:
            self._deadline = None
            if (
                self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
                and not self.transport.is_closing()
            ):
                self.transport.close()

    return GuardedH11Protocol


class SampledLog:
    """Logs at most one line per `interval` seconds and counts (by status) what it left out."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0):
        self.logger, self.interval = logger, interval
        self._last = -math.inf
        self.suppressed: Counter[str] = Counter()

    def record(self, row: dict[str, Any]) -> None:
        """Log `row` (with the counts left out since the last line) or count it."""
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed[str(row.get("status"))] += 1
            return
        self._last = now
        if self.suppressed:
            row = {**row, "suppressed": dict(self.suppressed)}
            self.suppressed.clear()
        self.logger.info(json.dumps(row))

    def flush(self) -> None:
        """Log the counts left out since the last line, if any."""
        if self.suppressed:
            row = {"ts": round(time.time(), 3), "suppressed": dict(self.suppressed)}
            self.logger.info(json.dumps(row))
            self.suppressed.clear()


class RepeatFilter(logging.Filter):
    """Lets each distinct message through at most once per `interval` seconds."""

    def __init__(self, interval: float = 10.0, max_messages: int = 256):
        super().__init__()
        self.interval, self.max_messages = interval, max_messages
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to emit this record."""
        if record.exc_info:
            return True
        now, msg = time.monotonic(), str(record.msg)
        if now - self._seen.get(msg, -math.inf) < self.interval:
            return False
        if len(self._seen) >= self.max_messages:
            self._seen.clear()
        self._seen[msg] = now
        return True


class AccessLog:
    """ASGI middleware: one JSON line per request with a key, sampled lines for the others."""

    def __init__(self, app, sampled: SampledLog):
        self.app, self.sampled, self.logger = app, sampled, sampled.logger

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state.update(key_id=None, images=0)
        status = None

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            row = {
                "ts": round(time.time(), 3),
                "method": scope.get("method"),
                "path": scope.get("path"),
                "key_id": state.get("key_id"),
                "images": state.get("images", 0),
                "status": 499 if status is None else status,
                "latency_ms": round(1000 * (time.perf_counter() - t0), 2),
            }
            if row["key_id"] is None:
                self.sampled.record(row)
            else:
                self.logger.info(json.dumps(row))


async def drain(request, limit: int) -> None:
    """Read and drop an oversized body (bounded) so the client sees the 413, not a reset."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > 8 * limit + (8 << 20):
                break
    except Exception:
        pass


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket (port 0: a free port, read back from getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP (not 0): asyncio turns Nagle off only on sockets that say they are TCP
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, settings: Any, graceful: int = 5):
    """The uvicorn Config for `app`: guarded connections, timeouts, concurrency cap, quiet logs."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=graceful,
        http=guarded_protocol(settings.read_timeout),
        timeout_keep_alive=settings.keep_alive_timeout,
        limit_concurrency=settings.max_connections,
    )
    # uvicorn warns once per refused or malformed request; a flood must not flood the log
    error_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, RepeatFilter) for f in error_logger.filters):
        error_logger.addFilter(RepeatFilter(settings.log_interval))
    return config


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "remaining": {"type": "integer", "description": "on 429 only"},
            },
        }
    },
}
_ERRORS = {
    "400": "malformed JSON or .npy, bad Idempotency-Key",
    "401": "missing, unknown or revoked API key (the same answer for each)",
    "409": "a request with this Idempotency-Key is still running",
    "413": "request body over the size limit",
    "415": "Content-Type is neither JSON nor .npy",
    "422": "wrong dtype, shape, range or batch size; Idempotency-Key reused with another body",
    "429": "the key's image budget does not cover the batch (error.remaining says what is left)",
    "503": "too many connections; retry with backoff",
}
PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {
                        "description": "(N, C, H, W) numbers in [0, 1] (or 0..255 as uint8 .npy)",
                        "type": "array",
                        "items": {
                            "type": "array",
                            "items": {
                                "type": "array",
                                "items": {"type": "array", "items": {"type": "number"}},
                            },
                        },
                    }
                },
            }
        },
        "application/x-npy": {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": ".npy of float32 in [0, 1] or uint8, shape (N, C, H, W); no pickle",
            }
        },
    },
}
IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": IDEMPOTENCY_KEY_MAX, "pattern": "^[A-Za-z0-9_-]+$"},
    "description": (
        "repeat with the same key and body: the stored answer, no second charge (header "
        "Idempotent-Replayed: true); kept for the server's idempotency TTL (default 24 h)"
    ),
}


def error_responses(*codes: str) -> dict[str, Any]:
    """OpenAPI `responses` entries for the given error statuses."""
    return {
        c: {
            "description": _ERRORS[c],
            "content": {"application/json": {"schema": _ERROR_SCHEMA}},
        }
        for c in codes
    }


def add_bearer_scheme(app) -> None:
    """Declare the bearer-key security scheme in the app's OpenAPI document."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            doc.setdefault("components", {})["securitySchemes"] = {
                "bearerKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key from `distillkit teacher-keys add`",
                }
            }
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi

"""RemoteTeacher: the Teacher protocol over HTTP to `distillkit serve-teacher` (urllib only).

The trainer hands teachers *normalised* tensors; the server expects pixels in [0, 1] and applies
its own normalisation. Give the client the normalisation of your data (`input_mean`, `input_std`)
and it undoes it before sending; without them, inputs are sent as they are.

Responses are cached on disk (SQLite) by a content hash of (server URL, response kind, the exact
float32 bytes sent), so an image that was already answered never spends budget again, across
epochs and across processes. Soft and top-k answers come back as probabilities (for top-k the
mass left over is spread evenly over the other classes); hard answers as labels.

Transport: one kept-alive connection per teacher (reopened when the server drops it), requests
serialised by a lock. Every attempt at one batch carries the same ``Idempotency-Key`` (a sha256 of
the images' content hashes), so a server that already answered and charged a batch whose answer
the client never received (a timeout) replays it instead of charging again; after each timeout the
next attempt waits twice as long (up to ``max_timeout``) so a slow answer can still arrive.
Redirects are never followed: the API key goes only to the configured origin. When the server
refuses a batch for budget (429) and says how many images remain, that many are bought (and
cached) before the budget error is raised. Error messages are one line and never hold the key.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import random
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillkit.teachers.base import BudgetExceededError, TeacherOutput


class RemoteTeacherError(RuntimeError):
    """The server answered with a client error (4xx other than 401/429), or never answered."""


class ServerBudgetError(BudgetExceededError):
    """The server refused a batch for budget; `remaining` is what it said is left (or None)."""

    def __init__(self, message: str, remaining: int | None = None):
        super().__init__(message)
        self.remaining = remaining


def _as_int(*values: Any) -> int | None:
    """The first value that reads as an integer, else None."""
    for value in values:
        try:
            return int(value)
        except (TypeError, ValueError):
            continue
    return None


def batch_key(row_hashes: Sequence[str]) -> str:
    """Idempotency key of a batch: hex sha256 over its images' content hashes, in order."""
    return hashlib.sha256("\n".join(row_hashes).encode()).hexdigest()


class ResponseCache:
    """Answers keyed by content hash, in a SQLite file (or in memory when path is None)."""

    def __init__(self, path: str | Path | None):
        target = ":memory:"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            target = str(path)
        self.conn = sqlite3.connect(target, check_same_thread=False)
        self.conn.execute("CREATE TABLE IF NOT EXISTS answers (h TEXT PRIMARY KEY, v BLOB)")
        self.conn.commit()

    def get_many(self, hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached answers for the hashes that have one."""
        out: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for h, v in self.conn.execute(
                f"SELECT h, v FROM answers WHERE h IN ({marks})", chunk
            ).fetchall():
                out[h] = np.lib.format.read_array(io.BytesIO(v), allow_pickle=False)
        return out

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        """Store answers (one row per image)."""
        rows = []
        for h, value in items.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
            rows.append((h, buf.getvalue()))
        self.conn.executemany("INSERT OR REPLACE INTO answers (h, v) VALUES (?, ?)", rows)
        self.conn.commit()

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0])


class RemoteTeacher:
    """A black-box teacher behind `distillkit serve-teacher`; `kind` is 'soft' or 'hard'."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        batch_size: int | None = None,
        cache_dir: str | Path | None = None,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        budget: int | None = None,
        retries: int = 5,
        backoff: float = 0.25,
        timeout: float = 60.0,
        max_timeout: float | None = None,
    ):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout  # seconds per socket operation on the first attempt
        # after a timeout the next attempt waits twice as long, up to this (default 4 x timeout)
        self.max_timeout = 4 * timeout if max_timeout is None else max_timeout
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._conn_origin: tuple[str, str, int] | None = None
        self._conn_used = False
        self._target()  # a malformed URL fails here, naming the problem
        self.input_mean = (
            None if input_mean is None else torch.tensor(input_mean, dtype=torch.float32)
        )
        self.input_std = None if input_std is None else torch.tensor(input_std, dtype=torch.float32)
        self.budget = budget  # client-side cap on images sent; the server enforces its own
        self.queries = 0  # images the server answered (cache hits excluded)
        self.cache_hits = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests = 0
        self.retried = 0
        self.replays = 0  # answers the server replayed for an Idempotency-Key (not charged again)
        self._info = self.info()
        self.responses = self._info["responses"]
        self.kind = "hard" if self.responses == "hard" else "soft"
        self.num_classes = int(self._info["num_classes"])
        self.input_shape = tuple(self._info["input_shape"])
        self.batch_size = min(batch_size or self._info["max_batch"], self._info["max_batch"])
        path = Path(cache_dir) / "responses.sqlite" if cache_dir is not None else None
        self.cache = ResponseCache(path)

    # -- protocol niceties ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> RemoteTeacher:
        """No-op: a remote teacher has no training mode (Distiller.train calls this)."""
        return self

    def eval(self) -> RemoteTeacher:
        """No-op, for symmetry with nn.Module."""
        return self

    @property
    def remaining(self) -> int | None:
        """Client-side budget left (None: no client cap)."""
        return None if self.budget is None else self.budget - self.queries

    def stats(self) -> dict[str, int]:
        """Counters for reports."""
        return {
            "queries": self.queries,
            "cache_hits": self.cache_hits,
            "requests": self.requests,
            "retries": self.retried,
            "replays": self.replays,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }

    # -- HTTP -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the kept-alive connection (the next request opens a new one)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        """Close and forget the connection."""
        if self._conn is not None:
            self._conn.close()
        self._conn, self._conn_origin, self._conn_used = None, None, False

    def _target(self) -> tuple[tuple[str, str, int], str]:
        """(scheme, host, port) and path prefix of the teacher URL; ValueError when unusable."""
        try:
            parts = urllib.parse.urlsplit(self.url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"teacher URL is not a valid http(s) URL: {exc}") from None
        if parts.username is not None or parts.password is not None:
            raise ValueError("teacher URL must not hold credentials; pass the key as api_key")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"teacher URL must look like http://HOST:PORT or https://HOST, got {self.url!r}"
            )
        default = 443 if parts.scheme == "https" else 80
        return (parts.scheme, parts.hostname, port or default), parts.path.rstrip("/")

    @staticmethod
    def _origin_text(origin: tuple[str, str, int]) -> str:
        """scheme://host:port, without credentials or path."""
        scheme, host, port = origin
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def _clean(self, text: str, limit: int = 400) -> str:
        """One line, the API key (and its secret part) redacted, at most `limit` characters."""
        secrets = [self.api_key]
        if self.api_key.count("-") >= 2:
            secrets.append(self.api_key.split("-", 2)[2])
        for secret in secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "[redacted]")
        text = " ".join(text.split())
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def _exchange(
        self,
        origin: tuple[str, str, int],
        target: str,
        method: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float,
    ) -> tuple[int, Any, bytes]:
        """One request on the kept-alive connection: (status, headers, body)."""
        while True:
            if self._conn is not None and self._conn_origin != origin:
                self._drop()  # the URL was changed: never send the key down the old connection
            if self._conn is None:
                scheme, host, port = origin
                cls = (
                    http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
                )
                self._conn, self._conn_origin, self._conn_used = cls(host, port), origin, False
            conn, reused = self._conn, self._conn_used
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except ConnectionError:
                self._drop()
                if reused:
                    # the server closed the idle connection (keep-alive timeout) before reading the
                    # request; resending at once on a fresh one is not a retry (the Idempotency-Key
                    # covers the case where it had been read after all)
                    continue
                raise
            except BaseException:
                # a late answer must never be read as the answer to the next request
                self._drop()
                raise
            self._conn_used = True
            if resp.will_close:
                self._drop()
            return resp.status, resp.headers, raw

    def _request(
        self, method: str, path: str, body: bytes | None = None, key: str | None = None
    ) -> dict[str, Any]:
        origin, prefix = self._target()
        where = f"{method} {self._origin_text(origin)}{prefix}{path}"
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/x-npy"
        if key is not None:
            # the same key on every attempt: a server that already answered (and charged) this
            # batch replays its answer instead of charging again
            headers["Idempotency-Key"] = key
        attempt, timeout = 0, self.timeout
        with self._lock:
            while True:
                cause: BaseException | None = None
                try:
                    status, resp_headers, raw = self._exchange(
                        origin, prefix + path, method, body, headers, timeout
                    )
                except (OSError, http.client.HTTPException) as exc:
                    cause, error = exc, f"{type(exc).__name__}: {exc}"
                    if isinstance(exc, TimeoutError):
                        # the answer may merely be slow: wait longer for the replay of it
                        timeout = min(2 * timeout, max(self.max_timeout, self.timeout))
                else:
                    self.requests += 1
                    self.bytes_sent += len(body or b"")
                    self.bytes_received += len(raw)
                    if status < 300:
                        return self._payload(where, status, resp_headers, raw)
                    if status < 400:
                        raise self._redirect_error(
                            where, origin, prefix + path, status, resp_headers
                        )
                    # 409 for a keyed request: the server is still answering the same batch
                    # (an earlier attempt); retry and receive its replay
                    if status < 500 and not (status == 409 and key is not None):
                        raise self._client_error(status, resp_headers, raw)
                    error = f"HTTP {status} {self._server_message(raw)[1]}"
                attempt += 1
                if attempt > self.retries:
                    raise RemoteTeacherError(
                        self._clean(f"{where} failed after {self.retries} retries: {error}")
                    ) from cause
                self.retried += 1
                # exponential backoff with jitter so many clients do not retry in lockstep
                time.sleep(self.backoff * (2 ** (attempt - 1)) * (0.5 + random.random()))

    def _payload(self, where: str, status: int, headers: Any, raw: bytes) -> dict[str, Any]:
        """The JSON of a 2xx answer; counts replays."""
        if str(headers.get("Idempotent-Replayed", "")).lower() == "true":
            self.replays += 1
        try:
            return json.loads(raw)
        except ValueError:
            raise RemoteTeacherError(
                self._clean(f"{where}: HTTP {status} answer is not JSON: {raw[:200]!r}")
            ) from None

    def _redirect_error(
        self, where: str, origin: tuple[str, str, int], target: str, status: int, headers: Any
    ) -> RemoteTeacherError:
        """Redirects are refused, naming the target (the key must not follow them)."""
        location = headers.get("Location")
        base = self._origin_text(origin) + target
        goal = urllib.parse.urljoin(base, location) if location else "(no Location header)"
        return RemoteTeacherError(
            self._clean(
                f"{where} was redirected (HTTP {status}) to {goal}; redirects are not followed, "
                f"so the API key only goes to {self._origin_text(origin)}: set the teacher URL "
                "to the final address"
            )
        )

    def _server_message(self, raw: bytes) -> tuple[dict[str, Any], str]:
        """The error object of a body and its 'code: message' text (raw text when not JSON)."""
        try:
            err = json.loads(raw)["error"]
            text = f"{err.get('code')}: {err.get('message')}"
        except (ValueError, KeyError, TypeError, AttributeError):
            err, text = {}, raw[:2000].decode("utf-8", "replace")
        return (err if isinstance(err, dict) else {}), self._clean(text, 300)

    def _client_error(self, status: int, headers: Any, raw: bytes) -> Exception:
        """The exception for a 4xx: PermissionError, ServerBudgetError or RemoteTeacherError."""
        err, text = self._server_message(raw)
        origin = self._origin_text(self._target()[0])
        if status == 401:
            return PermissionError(f"teacher server at {origin} refused the API key (401): {text}")
        if status in (402, 429):
            remaining = _as_int(headers.get("X-Budget-Remaining"), err.get("remaining"))
            left = "an unknown number of" if remaining is None else str(remaining)
            return ServerBudgetError(
                f"teacher server budget exhausted (HTTP {status}): {left} images remain ({text})",
                remaining,
            )
        return RemoteTeacherError(f"teacher server said HTTP {status} {text}")

    def info(self) -> dict[str, Any]:
        """The server's /v1/info for this key (input shape, classes, responses, remaining)."""
        return self._request("GET", "/v1/info")

    # -- Teacher protocol -------------------------------------------------------------------------
    def _to_pixels(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach().float().cpu()
        if self.input_mean is not None and self.input_std is not None:
            x = x * self.input_std.reshape(1, -1, 1, 1) + self.input_mean.reshape(1, -1, 1, 1)
        # rounding error of the round trip may step just outside [0, 1]
        return np.ascontiguousarray(x.clamp_(0.0, 1.0).numpy(), dtype=np.float32)

    def _answer_rows(self, payload: dict[str, Any]) -> list[np.ndarray]:
        if self.responses == "hard":
            return [np.asarray(v, dtype=np.int64) for v in payload["labels"]]
        if self.responses == "topk":
            rows = []
            for idx, p in zip(payload["indices"], payload["probs"]):
                p = np.asarray(p, dtype=np.float32)
                full = np.full(self.num_classes, 0.0, dtype=np.float32)
                rest = self.num_classes - len(idx)
                if rest:
                    full[:] = max(0.0, 1.0 - float(p.sum())) / rest
                full[np.asarray(idx, dtype=np.int64)] = p
                rows.append(full)
            return rows
        return [np.asarray(p, dtype=np.float32) for p in payload["probs"]]

    def _hashes(self, pixels: np.ndarray) -> list[str]:
        prefix = f"{self.url}|{self.responses}|{pixels.shape[1:]}|".encode()
        return [hashlib.sha256(prefix + row.tobytes()).hexdigest() for row in pixels]

    def _buy(
        self, pixels: np.ndarray, hashes: list[str], rows: list[int], known: dict[str, np.ndarray]
    ) -> Any:
        """Send rows of pixels as one request, store the answers; the server's remaining count."""
        buf = io.BytesIO()
        np.lib.format.write_array(buf, pixels[rows], allow_pickle=False)
        key = batch_key([hashes[i] for i in rows])
        payload = self._request("POST", "/v1/predict", buf.getvalue(), key=key)
        answers = self._answer_rows(payload)
        self.queries += len(rows)
        fresh = {hashes[i]: a for i, a in zip(rows, answers)}
        self.cache.put_many(fresh)
        known.update(fresh)
        return payload.get("remaining")

    def __call__(self, x: torch.Tensor) -> TeacherOutput:
        """Probabilities ('soft', top-k filled in) or labels ('hard'); cached images are free."""
        pixels = self._to_pixels(x)
        hashes = self._hashes(pixels)
        known = self.cache.get_many(hashes)
        missing = [i for i, h in enumerate(hashes) if h not in known]
        # duplicates inside one batch are sent once
        first: dict[str, int] = {}
        for i in missing:
            first.setdefault(hashes[i], i)
        todo = list(first.values())
        self.cache_hits += len(hashes) - len(todo)
        if self.budget is not None and self.queries + len(todo) > self.budget:
            raise BudgetExceededError(
                f"client query budget exceeded: {self.queries} used + {len(todo)} asked > "
                f"budget {self.budget}"
            )
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start : start + self.batch_size]
            try:
                self._buy(pixels, hashes, rows, known)
            except ServerBudgetError as exc:
                fits = exc.remaining
                if not fits or fits >= len(rows):
                    raise
                # buy what still fits: those answers are kept (cached) for this and later runs
                left = self._buy(pixels, hashes, rows[:fits], known)
                raise ServerBudgetError(
                    f"teacher server budget exhausted (HTTP 429): bought the {fits} images that "
                    f"still fit and kept their answers; {len(todo) - start - fits} images of this "
                    "call were not sent",
                    _as_int(left),
                ) from None
        values = np.stack([known[h] for h in hashes])
        out = torch.from_numpy(values).to(x.device)
        if self.kind == "hard":
            return TeacherOutput(labels=out.long())
        return TeacherOutput(probs=out.float())

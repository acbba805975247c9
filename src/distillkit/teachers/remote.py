"""RemoteTeacher: the Teacher protocol over HTTP to `distillkit serve-teacher` (urllib only).

The trainer hands teachers *normalised* tensors; the server expects pixels in [0, 1] and applies
its own normalisation. Give the client the normalisation of your data (`input_mean`, `input_std`)
and it undoes it before sending; without them, inputs are sent as they are.

Responses are cached on disk (SQLite) by a content hash of (server URL, response kind, the exact
float32 bytes sent), so an image that was already answered never spends budget again, across
epochs and across processes. Soft and top-k answers come back as probabilities (for top-k the
mass left over is spread evenly over the other classes); hard answers as labels.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillkit.teachers.base import BudgetExceededError, TeacherOutput


class RemoteTeacherError(RuntimeError):
    """The server answered with a client error (4xx other than 401/429), or never answered."""


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
    ):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
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
    def bytes_exchanged(self) -> int:
        """Request plus response body bytes so far."""
        return self.bytes_sent + self.bytes_received

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
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }

    # -- HTTP -------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/x-npy"
        attempt = 0
        while True:
            req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                self.requests += 1
                self.bytes_sent += len(body or b"")
                self.bytes_received += len(raw)
                return json.loads(raw)
            except urllib.error.HTTPError as exc:
                raw = exc.read()
                self.requests += 1
                self.bytes_sent += len(body or b"")
                self.bytes_received += len(raw)
                if exc.code < 500:
                    raise self._client_error(exc.code, raw) from None
                error: Exception = RemoteTeacherError(f"server error {exc.code}: {raw[:200]!r}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                error = exc
            attempt += 1
            if attempt > self.retries:
                raise RemoteTeacherError(
                    f"{method} {self.url}{path} failed after {self.retries} retries: {error}"
                ) from error
            self.retried += 1
            # exponential backoff with jitter so many clients do not retry in lockstep
            time.sleep(self.backoff * (2 ** (attempt - 1)) * (0.5 + random.random()))

    def _client_error(self, status: int, raw: bytes) -> Exception:
        try:
            err = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            err = {"code": "unknown", "message": raw[:200].decode("utf-8", "replace")}
        if status == 401:
            return PermissionError(f"teacher server at {self.url} refused the API key (401)")
        if status == 429:
            return BudgetExceededError(
                f"teacher server budget exhausted: {err.get('remaining')} images remain "
                f"({err.get('message')})"
            )
        return RemoteTeacherError(
            f"teacher server said {status} {err.get('code')}: {err.get('message')}"
        )

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
            buf = io.BytesIO()
            np.lib.format.write_array(buf, pixels[rows], allow_pickle=False)
            payload = self._request("POST", "/v1/predict", buf.getvalue())
            answers = self._answer_rows(payload)
            self.queries += len(rows)
            fresh = {hashes[i]: a for i, a in zip(rows, answers)}
            self.cache.put_many(fresh)
            known.update(fresh)
        values = np.stack([known[h] for h in hashes])
        out = torch.from_numpy(values).to(x.device)
        if self.kind == "hard":
            return TeacherOutput(labels=out.long())
        return TeacherOutput(probs=out.float())

"""API keys and per-key query budgets for the teacher server (standard library only).

Keys look like ``dk-<id>-<secret>``: the id is public (it names the key in logs and budgets), the
secret is 32 random bytes. Only ``sha256(key)`` is stored; because the secret is high-entropy a
fast hash is enough (slow password hashes protect low-entropy secrets). Verification compares
digests with ``hmac.compare_digest`` and does the same work whether or not the id exists, so a
caller learns nothing about which keys exist.

Budgets live in a SQLite file separate from the keys file: the keys file is configuration (edited
by ``distillkit teacher-keys``), the state file is what the server writes. Spending is a single
conditional ``UPDATE ... WHERE spent + n <= budget``, which SQLite executes atomically, so
concurrent requests (threads or several server processes on one file) can never over-spend.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

KEY_PREFIX = "dk"
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


def hash_key(key: str) -> str:
    """Hex sha256 of a presented key (what the keys file stores)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh (key_id, plaintext key) pair."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The public id inside a presented key, or None when it is not of our format."""
    parts = key.split("-", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1]:
        return None
    return parts[1]


@dataclass
class KeyRecord:
    """One API key as stored: public id, a human name, the hash, and an optional own budget."""

    id: str
    name: str
    sha256: str
    budget: int | None = None


class KeyStore:
    """The keys file (JSON): ``{"keys": [{"id", "name", "sha256", "budget"}]}``."""

    def __init__(self, path: str | Path | None = None, records: list[KeyRecord] | None = None):
        self.path = Path(path) if path is not None else None
        self.records: dict[str, KeyRecord] = {r.id: r for r in (records or [])}

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        """Read a keys file; a missing file is an error that names it."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"keys file not found: {p} (create one with `distillkit teacher-keys add NAME --keys {p}`)"
            )
        try:
            data = json.loads(p.read_text())
            records = [KeyRecord(**r) for r in data["keys"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"keys file {p} is not a valid keys file: {exc}") from None
        return cls(p, records)

    def save(self) -> None:
        """Write the keys file atomically, readable by its owner only."""
        if self.path is None:
            raise ValueError("this KeyStore has no path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"keys": [asdict(r) for r in self.records.values()]}, indent=2)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(payload + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def add(self, name: str, budget: int | None = None) -> str:
        """Create a key; returns the plaintext, which is never stored and cannot be shown again."""
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        key_id, key = new_key()
        while key_id in self.records:
            key_id, key = new_key()
        self.records[key_id] = KeyRecord(key_id, name, hash_key(key), budget)
        return key

    def verify(self, presented: str | None) -> KeyRecord | None:
        """The record of a valid key, else None; same work for unknown ids and wrong secrets."""
        presented = presented or ""
        key_id = key_id_of(presented)
        record = self.records.get(key_id) if key_id is not None else None
        expected = record.sha256 if record is not None else _DUMMY_HASH
        ok = hmac.compare_digest(hash_key(presented), expected)
        return record if (ok and record is not None) else None


class BudgetStore:
    """Images spent per key id, in SQLite, so a restarted server keeps every count."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # one connection guarded by a lock: SQLite serialises writers anyway, and the lock keeps
        # the read of `remaining` after an update consistent with that update
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS usage (key_id TEXT PRIMARY KEY, spent INTEGER NOT NULL)"
        )

    def spent(self, key_id: str) -> int:
        """Images served to this key so far."""
        with self._lock:
            row = self._conn.execute(
                "SELECT spent FROM usage WHERE key_id = ?", (key_id,)
            ).fetchone()
        return int(row[0]) if row else 0

    def remaining(self, key_id: str, budget: int | None) -> int | None:
        """Images this key may still ask for (None: unlimited)."""
        return None if budget is None else max(0, budget - self.spent(key_id))

    def reserve(self, key_id: str, n: int, budget: int | None) -> tuple[bool, int | None]:
        """Atomically spend n images if the budget allows; returns (granted, remaining after)."""
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO usage (key_id, spent) VALUES (?, 0)", (key_id,)
            )
            if budget is None:
                self._conn.execute(
                    "UPDATE usage SET spent = spent + ? WHERE key_id = ?", (n, key_id)
                )
                return True, None
            cur = self._conn.execute(
                "UPDATE usage SET spent = spent + ? WHERE key_id = ? AND spent + ? <= ?",
                (n, key_id, n, budget),
            )
            granted = cur.rowcount == 1
            row = self._conn.execute(
                "SELECT spent FROM usage WHERE key_id = ?", (key_id,)
            ).fetchone()
        return granted, max(0, budget - int(row[0]))

    def refund(self, key_id: str, n: int) -> None:
        """Give back a reservation whose request then failed on the server's side."""
        with self._lock:
            self._conn.execute(
                "UPDATE usage SET spent = MAX(0, spent - ?) WHERE key_id = ?", (n, key_id)
            )

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

"""API keys and per-key query budgets for the teacher server (standard library only).

Keys look like ``dk-<id>-<secret>``: the id is public (it names the key in logs and budgets), the
secret is 32 random bytes. Only ``sha256(key)`` is stored; because the secret is high-entropy a
fast hash is enough (slow password hashes protect low-entropy secrets). Verification compares
digests with ``hmac.compare_digest`` and does the same work whether or not the id exists, so a
caller learns nothing about which keys exist.

Budgets live in a SQLite file separate from the keys file (``BudgetStore``, in
``server_store``): the keys file is configuration (edited by ``distillkit teacher-keys``), the state
file is what the server writes. A running server re-reads the keys file when it changes (checked
with one ``stat`` per request), so an added or revoked key takes effect on the next request; a keys
file that disappears or cannot be parsed refuses every key until it is fixed (fail closed).
Revoking marks a record (``revoked``: UTC time) instead of deleting it, so listings keep its history.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from distillkit.files import write_text_atomically
from distillkit.teachers.server_store import BudgetStore

__all__ = ["BudgetStore", "KeyRecord", "KeyStore", "hash_key", "key_id_of", "new_key"]
log = logging.getLogger("distillkit.serve")

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
    """One API key as stored: public id, name, hash, optional own budget, revocation time."""

    id: str
    name: str
    sha256: str
    budget: int | None = None
    revoked: str | None = None


class KeyStore:
    """The keys file (JSON): ``{"keys": [{"id", "name", "sha256", "budget"}]}``."""

    def __init__(self, path: str | Path | None = None, records: list[KeyRecord] | None = None):
        self.path = Path(path) if path is not None else None
        self.records: dict[str, KeyRecord] = {r.id: r for r in (records or [])}
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _read(p: Path) -> list[KeyRecord]:
        if not p.is_file():
            raise FileNotFoundError(
                f"keys file not found: {p} (create one with `distillkit teacher-keys add NAME --keys {p}`)"
            )
        try:
            data = json.loads(p.read_text())
            return [KeyRecord(**r) for r in data["keys"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"keys file {p} is not a valid keys file: {exc}") from None

    @staticmethod
    def _stat(p: Path) -> tuple[int, int, int] | None:
        try:
            st = p.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        """Read a keys file; a missing file is an error that names it."""
        p = Path(path)
        stamp = cls._stat(p)
        store = cls(p, cls._read(p))
        store._stamp = stamp
        return store

    def refresh(self) -> None:
        """Re-read the keys file if it changed since it was read (one stat when it did not)."""
        if self.path is None or self._stamp is None and not self.path.exists():
            return  # an in-memory store, or one whose file was never written
        stamp = self._stat(self.path)
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                records = self._read(self.path)
            except (FileNotFoundError, ValueError) as exc:
                # fail closed: a key removed by a broken edit must not stay valid
                log.error("%s; refusing every key until the keys file is fixed", exc)
                records = []
            self.records = {r.id: r for r in records}
            self._stamp = stamp

    def save(self) -> None:
        """Write the keys file atomically, readable by its owner only."""
        if self.path is None:
            raise ValueError("this KeyStore has no path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # `revoked` only where set: files without revocations stay readable by older versions
        rows = [
            {k: v for k, v in asdict(r).items() if k != "revoked" or v is not None}
            for r in self.records.values()
        ]
        payload = json.dumps({"keys": rows}, indent=2)
        # 0600 from creation on: the file holds the hashes of every key
        write_text_atomically(self.path, payload + "\n", mode=0o600)
        self._stamp = self._stat(self.path)

    def add(self, name: str, budget: int | None = None) -> str:
        """Create a key; returns the plaintext, which is never stored and cannot be shown again."""
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        key_id, key = new_key()
        while key_id in self.records:
            key_id, key = new_key()
        self.records[key_id] = KeyRecord(key_id, name, hash_key(key), budget)
        return key

    def find(self, ident: str) -> KeyRecord:
        """The record with this id, or the only one with this name; ValueError otherwise."""
        if ident in self.records:
            return self.records[ident]
        named = [r for r in self.records.values() if r.name == ident]
        if len(named) == 1:
            return named[0]
        where = f"in {self.path}" if self.path is not None else "in this key store"
        if named:
            ids = ", ".join(r.id for r in named)
            raise ValueError(
                f"{len(named)} keys are named {ident!r} {where} (ids {ids}); give the id"
            )
        raise ValueError(f"no key with id or name {ident!r} {where}")

    def revoke(self, ident: str) -> tuple[KeyRecord, bool]:
        """Mark a key (id or unique name) revoked; returns (record, False if it already was)."""
        record = self.find(ident)
        if record.revoked is not None:
            return record, False
        record.revoked = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return record, True

    def verify(self, presented: str | None) -> KeyRecord | None:
        """The record of a valid key, else None; same work for unknown ids and wrong secrets."""
        presented = presented or ""
        key_id = key_id_of(presented)
        record = self.records.get(key_id) if key_id is not None else None
        expected = record.sha256 if record is not None else _DUMMY_HASH
        ok = hmac.compare_digest(hash_key(presented), expected)
        return record if (ok and record is not None and record.revoked is None) else None

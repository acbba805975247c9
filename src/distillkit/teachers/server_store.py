"""The teacher server's state in one SQLite file: budgets, pending reservations, replayable replies.

Charging follows delivery. A request first *reserves* its images: a row in ``reservations``,
counted against the key's budget together with what was already spent, inside one ``BEGIN
IMMEDIATE`` transaction, so concurrent requests (threads, or several server processes on one file)
can never over-spend. The reservation is then either *committed* (added to ``usage.spent``) once
the answer has been handed to the connection, or *released* when the client has gone, inference
failed or the request was cancelled. A reservation whose server process died (``kill -9``) is
released by the next server that opens the file: rows name their process id, and a row whose
process no longer runs, or that is older than ``stale_after`` seconds, is released.

Idempotency: a request may carry a key. Its reservation records (key, fingerprint of the body);
committing it also stores the reply (zlib-compressed) under (API key id, idempotency key) for
``reply_ttl`` seconds. A repeat with the same body gets the stored reply without a charge, a repeat
with another body is refused, and a repeat while the first is still running waits for it (the
unique index on pending keys makes concurrent duplicates claim at most one reservation).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("distillkit.serve")

# owners (one per open store) alive in this process: a row of this pid with another owner is stale
_LIVE_OWNERS: set[str] = set()

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usage (key_id TEXT PRIMARY KEY, spent INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS reservations (id TEXT PRIMARY KEY, key_id TEXT NOT NULL,"
    " n INTEGER NOT NULL, pid INTEGER NOT NULL, owner TEXT NOT NULL, created REAL NOT NULL,"
    " idem TEXT, fingerprint TEXT)",
    "CREATE INDEX IF NOT EXISTS reservations_key ON reservations (key_id)",
    "CREATE UNIQUE INDEX IF NOT EXISTS reservations_idem ON reservations (key_id, idem)"
    " WHERE idem IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS replies (key_id TEXT NOT NULL, idem TEXT NOT NULL,"
    " fingerprint TEXT NOT NULL, body BLOB NOT NULL, created REAL NOT NULL,"
    " PRIMARY KEY (key_id, idem))",
    "CREATE INDEX IF NOT EXISTS replies_created ON replies (created)",
)


@dataclass(frozen=True)
class Claim:
    """The outcome of `BudgetStore.begin`.

    status is ``reserved`` (reservation holds its id), ``refused`` (over budget), ``replay``
    (body holds the stored reply), ``mismatch`` (the idempotency key was used with another
    body) or ``in_progress`` (a request with this idempotency key is still running).
    """

    status: str
    reservation: str | None = None
    remaining: int | None = None
    body: bytes | None = None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (a zombie counts as dead)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:  # Linux: a killed child not yet reaped by its parent is a zombie, not a server
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class BudgetStore:
    """Images spent, pending and replayable per key id, in SQLite (survives restarts)."""

    def __init__(
        self,
        path: str | Path,
        reply_ttl: float = 86400.0,
        max_replies: int = 100_000,
        stale_after: float = 3600.0,
    ):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.reply_ttl, self.max_replies, self.stale_after = reply_ttl, max_replies, stale_after
        self.owner = uuid.uuid4().hex
        self._last_purge = self._last_stale = 0.0
        self._closed = False
        # one connection guarded by a lock: SQLite serialises writers anyway, and the lock keeps
        # each read-check-write sequence of this process in one transaction
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives the process being killed (it is in the OS's cache) and
        # costs no fsync; only an OS crash or power loss can drop the last commits
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        for statement in SCHEMA:
            self._conn.execute(statement)
        _LIVE_OWNERS.add(self.owner)
        released = self.release_stale()
        if released:
            log.warning("released %d images reserved by a server that stopped", released)
        self.purge_replies()

    def _tx(self):
        """An immediate (write-locking) transaction on the shared connection."""
        return _Transaction(self._conn)

    def spent(self, key_id: str) -> int:
        """Images charged to this key so far (delivered answers)."""
        with self._lock:
            return self._spent(key_id)

    def pending(self, key_id: str) -> int:
        """Images reserved by requests of this key that are still running."""
        with self._lock:
            return self._pending(key_id)

    def _pending(self, key_id: str) -> int:
        row = self._conn.execute(
            "SELECT COALESCE(SUM(n), 0) FROM reservations WHERE key_id = ?", (key_id,)
        ).fetchone()
        return int(row[0])

    def _spent(self, key_id: str) -> int:
        row = self._conn.execute("SELECT spent FROM usage WHERE key_id = ?", (key_id,)).fetchone()
        return int(row[0]) if row else 0

    def remaining(self, key_id: str, budget: int | None) -> int | None:
        """Images this key may still ask for (None: unlimited); running requests count as spent."""
        if budget is None:
            return None
        with self._lock:
            return max(0, budget - self._spent(key_id) - self._pending(key_id))

    def reserve(self, key_id: str, n: int, budget: int | None) -> tuple[str | None, int | None]:
        """Reserve n images if the budget allows: (reservation id or None, remaining after)."""
        claim = self.begin(key_id, n, budget)
        return claim.reservation, claim.remaining

    def begin(
        self,
        key_id: str,
        n: int,
        budget: int | None,
        idem: str | None = None,
        fingerprint: str | None = None,
    ) -> Claim:
        """Replay a stored reply, or reserve n images atomically (see Claim for the outcomes)."""
        now = time.time()
        with self._lock, self._tx():
            if now - self._last_stale > 30.0:  # a sibling server on this file may have died
                self._release_stale(now)
            if idem is not None:
                row = self._conn.execute(
                    "SELECT fingerprint, body, created FROM replies WHERE key_id = ? AND idem = ?",
                    (key_id, idem),
                ).fetchone()
                if row is not None and row[2] < now - self.reply_ttl:
                    self._conn.execute(
                        "DELETE FROM replies WHERE key_id = ? AND idem = ?", (key_id, idem)
                    )
                    row = None
                if row is not None:
                    if row[0] != fingerprint:
                        return Claim("mismatch")
                    return Claim("replay", body=zlib.decompress(row[1]))
                running = self._conn.execute(
                    "SELECT fingerprint FROM reservations WHERE key_id = ? AND idem = ?",
                    (key_id, idem),
                ).fetchone()
                if running is not None:
                    return Claim("mismatch" if running[0] != fingerprint else "in_progress")
            used = self._spent(key_id) + self._pending(key_id)
            if budget is not None and used + n > budget:
                return Claim("refused", remaining=max(0, budget - used))
            rid = uuid.uuid4().hex
            self._conn.execute(
                "INSERT INTO reservations (id, key_id, n, pid, owner, created, idem, fingerprint)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rid, key_id, n, os.getpid(), self.owner, now, idem, fingerprint),
            )
        remaining = None if budget is None else max(0, budget - used - n)
        return Claim("reserved", reservation=rid, remaining=remaining)

    def commit(self, reservation: str, reply: bytes | None = None) -> bool:
        """Charge a reservation (its answer was delivered) and store the reply if it had a key."""
        now = time.time()
        with self._lock, self._tx():
            row = self._conn.execute(
                "SELECT key_id, n, idem, fingerprint FROM reservations WHERE id = ?",
                (reservation,),
            ).fetchone()
            if row is None:  # released meanwhile (a restarted sibling judged it stale)
                return False
            key_id, n, idem, fingerprint = row
            self._conn.execute("DELETE FROM reservations WHERE id = ?", (reservation,))
            self._conn.execute(
                "INSERT INTO usage (key_id, spent) VALUES (?, ?)"
                " ON CONFLICT (key_id) DO UPDATE SET spent = spent + excluded.spent",
                (key_id, n),
            )
            if idem is not None and reply is not None:
                self._conn.execute(
                    "INSERT OR REPLACE INTO replies (key_id, idem, fingerprint, body, created)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (key_id, idem, fingerprint, zlib.compress(reply, 6), now),
                )
        if now - self._last_purge > min(60.0, self.reply_ttl):
            self.purge_replies()
        return True

    def release(self, reservation: str) -> None:
        """Drop a reservation whose answer was not delivered: nothing is charged."""
        with self._lock:
            self._conn.execute("DELETE FROM reservations WHERE id = ?", (reservation,))

    def release_stale(self) -> int:
        """Release reservations of dead processes (or older than stale_after); returns images."""
        with self._lock, self._tx():
            return self._release_stale(time.time())

    def _release_stale(self, now: float) -> int:
        self._last_stale = now
        released = 0
        rows = self._conn.execute("SELECT id, n, pid, owner, created FROM reservations")
        alive: dict[int, bool] = {}
        for rid, n, pid, owner, created in rows.fetchall():
            if pid == os.getpid():
                dead = owner not in _LIVE_OWNERS
            else:
                if pid not in alive:
                    alive[pid] = _pid_alive(pid)
                dead = not alive[pid]
            if dead or created < now - self.stale_after:
                self._conn.execute("DELETE FROM reservations WHERE id = ?", (rid,))
                released += n
        return released

    def purge_replies(self) -> int:
        """Drop expired replies, then the oldest beyond max_replies; returns rows dropped."""
        now = time.time()
        with self._lock, self._tx():
            cur = self._conn.execute(
                "DELETE FROM replies WHERE created < ?", (now - self.reply_ttl,)
            )
            dropped = cur.rowcount
            count = self._conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
            if count > self.max_replies:
                cur = self._conn.execute(
                    "DELETE FROM replies WHERE rowid IN"
                    " (SELECT rowid FROM replies ORDER BY created LIMIT ?)",
                    (count - self.max_replies,),
                )
                dropped += cur.rowcount
        self._last_purge = now
        return dropped

    def close(self) -> None:
        """Release this store's remaining reservations (never delivered) and close the database."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.execute("DELETE FROM reservations WHERE owner = ?", (self.owner,))
            finally:
                self._conn.close()
                _LIVE_OWNERS.discard(self.owner)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *exc: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")

"""The /v1/responses store: finished responses in SQLite, bounded by count, bytes and age.

One row per response, keyed by (tenant, id): a tenant reads and chains only its own. The count
and bytes bounds are each tenant's own share (StoreLimits): a write evicts only the writer's
oldest rows, so no tenant's flood can push another's responses out, and the whole store holds
at most (tenants) x the share, the tenants being the configured API keys (or the one unkeyed).
Each row is
self-contained: the response object, this turn's input items, and the conversation before it
(every earlier turn's input and output items, in order), so a chain rebuilds from one row even
after an earlier response has been deleted or evicted. Every write is one transaction: the
insert and the eviction of the oldest rows past the bounds commit together or not at all, and a
crash mid-write loses nothing already committed (WAL journal, synchronous=FULL: a response the
client was told is stored is on disk).

Synchronous, one connection, not thread-safe by itself: the caller runs every call in one worker
thread at a time (app/http/response_store.py).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

MEMORY = ":memory:"
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    created_at REAL NOT NULL,
    size INTEGER NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    history TEXT NOT NULL,
    UNIQUE (tenant, id)
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created_at);
CREATE INDEX IF NOT EXISTS responses_tenant ON responses (tenant, seq);
"""
# One tenant's rows past its share, newest kept first: a running total of sizes and a row number.
EVICT = """
DELETE FROM responses WHERE seq IN (
    SELECT seq FROM (
        SELECT seq,
               SUM(size) OVER (ORDER BY seq DESC) AS running,
               ROW_NUMBER() OVER (ORDER BY seq DESC) AS place
        FROM responses WHERE tenant = ?
    ) WHERE running > ? OR place > ?
)
"""
Item = dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Each tenant's share (--responses-max-count, --responses-max-mb), and everyone's age bound."""

    max_count: int = 10_000
    max_bytes: int = 256 * 1024 * 1024
    ttl_seconds: float = 30 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.max_count < 1 or self.max_bytes < 1 or not self.ttl_seconds > 0:
            raise ValueError("the response store's limits must be positive")


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: dict[str, Any]  # the response object, as the client got it
    input_items: list[Item]  # this turn's input items, each with its id
    history: list[Item]  # every earlier turn's input and output items, in order

    def conversation(self) -> list[Item]:
        """What a response chained to this one continues: the history, this input, this output."""
        return [*self.history, *self.input_items, *self.response.get("output", [])]


def encode(stored: StoredResponse) -> bytes:
    """A stored response as one JSON document: what Redis holds, and the size both stores count
    against a tenant's share (and the routes check a conversation against before generating)."""
    document = {"response": stored.response, "input_items": stored.input_items, "history": stored.history}
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def decode(raw: bytes) -> StoredResponse | None:
    """None for a value that is not ours (another format, a damaged or foreign value)."""
    try:
        document: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    response, input_items, history = (document.get(name) for name in ("response", "input_items", "history"))
    if not (isinstance(response, dict) and isinstance(input_items, list) and isinstance(history, list)):
        return None
    if not all(isinstance(item, dict) for item in (*input_items, *history)):
        return None
    return StoredResponse(response, input_items, history)


class ResponseBackend(Protocol):
    """What the routes need of a store: this SQLite one, or Redis' (app/store/redis_responses.py).
    Both bound each tenant by the same StoreLimits, counting each response as ``encode`` sizes it."""

    def put(self, tenant: str | None, stored: StoredResponse) -> None: ...

    def get(self, tenant: str | None, response_id: str) -> StoredResponse | None: ...

    def delete(self, tenant: str | None, response_id: str) -> bool: ...

    def close(self) -> None: ...


class SqliteResponseStore:
    def __init__(
        self, path: str | Path, limits: StoreLimits | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = str(path)
        self.limits = limits or StoreLimits()
        self._clock = clock
        if self.path != MEMORY:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != MEMORY:
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _oldest_kept(self) -> float:
        return self._clock() - self.limits.ttl_seconds

    def put(self, tenant: str | None, stored: StoredResponse) -> None:
        """Store one response (its id is ``response["id"]``), then evict past the bounds: both or
        neither."""
        texts = [json.dumps(part, ensure_ascii=False) for part in (stored.response, stored.input_items, stored.history)]
        size = len(encode(stored))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (tenant, id, created_at, size, response, input_items, history)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (tenant or "", stored.response["id"], self._clock(), size, *texts),
            )
            self._evict(tenant or "")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _evict(self, tenant: str) -> None:
        self._db.execute("DELETE FROM responses WHERE created_at < ?", (self._oldest_kept(),))
        self._db.execute(EVICT, (tenant, self.limits.max_bytes, self.limits.max_count))

    def get(self, tenant: str | None, response_id: str) -> StoredResponse | None:
        row = self._db.execute(
            "SELECT response, input_items, history FROM responses WHERE tenant = ? AND id = ? AND created_at >= ?",
            (tenant or "", response_id, self._oldest_kept()),
        ).fetchone()
        if row is None:
            return None
        return StoredResponse(json.loads(row[0]), json.loads(row[1]), json.loads(row[2]))

    def delete(self, tenant: str | None, response_id: str) -> bool:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            cursor = self._db.execute(
                "DELETE FROM responses WHERE tenant = ? AND id = ? AND created_at >= ?",
                (tenant or "", response_id, self._oldest_kept()),
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return cursor.rowcount > 0

    def count(self, tenant: str | None = None) -> int:
        """Rows stored (``tenant``'s alone when given)."""
        where, args = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        return int(self._db.execute(f"SELECT COUNT(*) FROM responses {where}", args).fetchone()[0])

    def total_bytes(self, tenant: str | None = None) -> int:
        """Bytes counted against the bounds (``tenant``'s alone when given)."""
        where, args = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        return int(self._db.execute(f"SELECT COALESCE(SUM(size), 0) FROM responses {where}", args).fetchone()[0])

"""The /v1/responses store (app/store/responses.py): bounds, order, tenants, restarts, failures."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.store.responses import MEMORY, SqliteResponseStore, StoredResponse, StoreLimits

ROOT = Path(__file__).resolve().parent.parent


def stored(number: int, text: str = "hi") -> StoredResponse:
    response = {"id": f"resp_{number:032x}", "output": [{"type": "message", "id": f"msg_{number}", "text": text}]}
    return StoredResponse(response, [{"type": "message", "role": "user", "content": text}], [])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_oldest_go_first_past_the_count() -> None:
    store = SqliteResponseStore(MEMORY, StoreLimits(max_count=3))
    for number in range(5):
        store.put(None, stored(number))
    assert [store.get(None, stored(n).response["id"]) is not None for n in range(5)] == [False, False, True, True, True]
    assert store.count() == 3


def test_the_oldest_go_first_past_the_bytes() -> None:
    one = SqliteResponseStore(MEMORY)
    one.put(None, stored(0, "x" * 1000))
    size = one.total_bytes()
    store = SqliteResponseStore(MEMORY, StoreLimits(max_bytes=2 * size + size // 2))
    for number in range(4):
        store.put(None, stored(number, "x" * 1000))
    assert store.count() == 2
    assert store.get(None, stored(1).response["id"]) is None
    assert store.get(None, stored(3).response["id"]) is not None
    assert store.total_bytes() <= 2 * size + size // 2


def test_a_response_older_than_the_ttl_is_gone_for_reads_and_writes() -> None:
    clock = Clock()
    store = SqliteResponseStore(MEMORY, StoreLimits(ttl_seconds=60), clock=clock)
    store.put(None, stored(0))
    clock.now += 30
    store.put(None, stored(1))
    clock.now += 31
    assert store.get(None, stored(0).response["id"]) is None  # expired: not read even before a write
    assert store.get(None, stored(1).response["id"]) is not None
    assert store.delete(None, stored(0).response["id"]) is False
    store.put(None, stored(2))  # a write removes what expired
    assert store.count() == 2


def test_tenants_see_only_their_own() -> None:
    store = SqliteResponseStore(MEMORY)
    store.put("alice", stored(0, "alice's"))
    rid = stored(0).response["id"]
    assert store.get("bob", rid) is None
    assert store.get(None, rid) is None
    assert store.delete("bob", rid) is False
    found = store.get("alice", rid)
    assert found is not None and found.input_items[0]["content"] == "alice's"
    assert store.delete("alice", rid) is True
    assert store.get("alice", rid) is None


def test_each_tenant_has_its_own_share_and_a_flood_evicts_only_the_flooders() -> None:
    """Breakage caught: bounds over the whole store (bob's writes pushed alice's out: a 404)."""
    one = SqliteResponseStore(MEMORY)
    one.put(None, stored(0, "x" * 1000))
    size = one.total_bytes()
    store = SqliteResponseStore(MEMORY, StoreLimits(max_count=3, max_bytes=3 * size + size // 2))
    store.put("alice", stored(0, "x" * 1000))
    for number in range(1, 40):
        store.put("bob", stored(number, "x" * 1000))
    assert store.get("alice", stored(0).response["id"]) is not None
    assert store.count("alice") == 1 and store.count("bob") == 3 <= store.limits.max_count
    assert store.total_bytes("bob") <= 3 * size + size // 2
    assert [store.get("bob", stored(n).response["id"]) is not None for n in (36, 37, 38, 39)] == [
        False,
        True,
        True,
        True,
    ]


def test_the_conversation_is_history_then_input_then_output() -> None:
    first = stored(0, "one")
    later = StoredResponse(stored(1, "two").response, stored(1, "two").input_items, first.conversation())
    assert [item.get("text", item.get("content")) for item in later.conversation()] == ["one", "one", "two", "two"]


def test_a_stored_response_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "responses.db"
    store = SqliteResponseStore(path)
    store.put("t", stored(7, "kept"))
    store.close()
    again = SqliteResponseStore(path)
    found = again.get("t", stored(7).response["id"])
    assert found is not None and found.response["output"][0]["text"] == "kept"
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_write_that_fails_mid_transaction_loses_nothing_and_adds_nothing(tmp_path: Path) -> None:
    class Failing(SqliteResponseStore):
        def _evict(self, tenant: str) -> None:  # after the insert, inside the transaction
            raise RuntimeError("disk on fire")

    path = tmp_path / "responses.db"
    good = SqliteResponseStore(path, StoreLimits(max_count=1))
    good.put(None, stored(0))
    good.close()
    failing = Failing(path, StoreLimits(max_count=1))
    with pytest.raises(RuntimeError):
        failing.put(None, stored(1))
    assert failing.get(None, stored(1).response["id"]) is None
    assert failing.get(None, stored(0).response["id"]) is not None
    # the connection is usable after the rollback:
    assert failing.delete(None, stored(0).response["id"]) is True


def test_a_writer_killed_mid_transaction_loses_nothing_already_committed(tmp_path: Path) -> None:
    path = tmp_path / "responses.db"
    code = f"""
import os
from app.store.responses import SqliteResponseStore, StoredResponse
store = SqliteResponseStore({str(path)!r})
for n in range(3):
    store.put(None, StoredResponse({{"id": "resp_%032x" % n, "output": []}}, [], []))
store._db.execute("BEGIN IMMEDIATE")
store._db.execute("INSERT INTO responses (tenant, id, created_at, size, response, input_items, history)"
                  " VALUES ('', 'resp_half', 0, 1, '{{}}', '[]', '[]')")
os._exit(9)  # killed with the transaction open
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    store = SqliteResponseStore(path)
    assert store.count() == 3
    assert store.get(None, "resp_half") is None
    assert all(store.get(None, f"resp_{n:032x}") is not None for n in range(3))


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        StoreLimits(max_count=0)
    with pytest.raises(ValueError):
        StoreLimits(ttl_seconds=0)


async def test_the_routes_store_runs_off_the_event_loop_one_call_at_a_time() -> None:
    import threading

    import trio

    from app.http.response_store import AsyncResponseStore

    loop_thread = threading.get_ident()
    seen: list[int] = []
    inside = 0
    most = 0

    class Watched(SqliteResponseStore):
        def put(self, tenant: str | None, response: StoredResponse) -> None:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            seen.append(threading.get_ident())
            time.sleep(0.01)
            super().put(tenant, response)
            inside -= 1

    store = AsyncResponseStore(Watched(MEMORY))
    async with trio.open_nursery() as nursery:
        for number in range(4):
            nursery.start_soon(store.put, None, stored(number))
    assert loop_thread not in seen and len(seen) == 4
    assert most == 1  # one connection, one call at a time
    assert await store.get(None, stored(3).response["id"]) is not None
    await store.close()

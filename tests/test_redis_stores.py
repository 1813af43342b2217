"""The stores replicas share, against a real redis-server (tests/redis_server.py): the prompt
cache's shared tier and the /v1/responses store; their keys and JSON; TTLs; tenants; and what an
outage does (misses and skipped writes, counted, never an exception to the request; back to
work once Redis is)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from actors import cache_codec
from actors.cached_response import CachedResponse
from actors.messages import StreamDone, StreamError, StreamEvent, StreamStarted, StreamToken, Timings, Usage
from actors.metrics_events import MetricsEvent
from actors.prompt_cache import PromptCache
from actors.shared_cache import RedisSharedCache
from app.cache.redis_store import RedisCacheStore
from app.cache.store import ResponseStore
from app.http.response_store import AsyncResponseStore, StoreUnavailable
from app.store.redis_link import KEY_PREFIX, RedisLink, RedisUnavailable, as_bytes, connect, hashed_key, redacted
from app.store.redis_responses import RedisResponseStore
from app.store.responses import StoredResponse, StoreLimits, encode
from app.text.logprobs import ShownLogprob, ShownLogprobs
from tests.redis_server import RedisServer, redis_server
from tests.test_prompt_cache import ScriptedGeneration, drain

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as running:
        yield running


@pytest.fixture
def redis_db(server: RedisServer) -> Iterator[RedisServer]:
    """The module's server, empty for each test (and running: a test may have killed it)."""
    if server.process is None:
        server.start()
    server.flush()
    yield server


def link_to(server: RedisServer, *, pause: float = 0.0) -> RedisLink:
    return RedisLink(connect(server.url, 0.5), pause_seconds=pause)


def answer(*texts: str, reason: str = "stop") -> CachedResponse:
    chosen = ShownLogprob("é", "é".encode(), -0.25)
    tokens = tuple(StreamToken(text, 100 + i, i, "final") for i, text in enumerate(texts))
    tokens += (StreamToken("", 7, len(texts), "commentary", ShownLogprobs(chosen, (chosen,)), (), "functions.f", 1),)
    return CachedResponse(tokens, StreamDone("r0", reason, Usage(5, len(tokens), 2), Timings(1.0, 2.0, 3.0, 4.0)))  # type: ignore[arg-type]


def stored(response_id: str, text: str = "hi") -> StoredResponse:
    response = {"id": response_id, "object": "response", "output": [{"type": "message", "content": text}]}
    return StoredResponse(response, [{"id": "msg_1", "role": "user", "content": "q"}], [])


async def finish_once_started(generation: ScriptedGeneration) -> None:
    """The shared lookup runs in the background: the generation starts only once it missed."""
    with trio.fail_after(5):
        while generation.out is None:
            await trio.sleep(0.01)
    generation.emit_tokens()
    generation.finish_now()


# -- keys and JSON ----------------------------------------------------------------------------------


def test_keys_are_a_versioned_prefix_and_a_digest_the_same_in_every_process() -> None:
    key = hashed_key("resp", "tenant", "resp_abc")
    assert key.startswith(f"{KEY_PREFIX}:resp:") and KEY_PREFIX == "gptoss:v1"
    assert "resp_abc" not in key and "tenant" not in key, "a client's id is never part of a key"
    assert hashed_key("resp", "tenant", "resp_abc") == key
    assert hashed_key("resp", "tenan", "tresp_abc") != key, "the parts cannot be joined differently"
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "from app.store.redis_link import hashed_key; print(hashed_key('resp', 'tenant', 'resp_abc'))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    )
    assert other.stdout.strip() == key


def test_a_cached_answer_round_trips_through_json_and_nothing_else_decodes() -> None:
    original = answer("Hel", "lo")
    raw = cache_codec.encode(original)
    document = json.loads(raw)  # plain JSON, never pickle
    assert document["done"] == {"finish_reason": "stop", "usage": [5, 3, 2]}
    back = cache_codec.decode(raw)
    assert back is not None and back.tokens == original.tokens
    assert back.done.finish_reason == "stop" and back.done.usage == original.done.usage
    for foreign in (
        b"\x80\x04pickle",
        b"[]",
        b'{"tokens": [], "done": {"finish_reason": "cancelled", "usage": [1, 1, 0]}}',
        raw.replace(b'"token_id":100', b'"token_id":"100"'),
        raw.replace(b'"index":0', b'"index":true'),
    ):
        assert cache_codec.decode(foreign) is None


def test_redacted_urls_hide_the_password() -> None:
    assert redacted("redis://user:s3cret@cache.internal:6380/2") == "redis://user:***@cache.internal:6380/2"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# -- the /v1/responses store ------------------------------------------------------------------------


def test_responses_round_trip_per_tenant_and_are_json_under_hashed_keys(redis_db: RedisServer) -> None:
    store = RedisResponseStore(link_to(redis_db))
    store.put("alice", stored("resp_1", "for alice"))
    store.put(None, stored("resp_1", "for nobody"))
    found = store.get("alice", "resp_1")
    assert found is not None and found.response["output"][0]["content"] == "for alice"
    assert found.conversation()[0]["content"] == "q"
    assert store.get("bob", "resp_1") is None, "another tenant reads nothing"
    assert store.get(None, "resp_1").response["output"][0]["content"] == "for nobody"  # type: ignore[union-attr]
    keys = sorted(as_bytes(key).decode() for key in redis_db.client().keys("*"))  # type: ignore[union-attr]
    bookkeeping = [hashed_key(kind, tenant) for kind in ("resp-index", "resp-tally") for tenant in ("alice", "")]
    assert keys == sorted([hashed_key("resp", "alice", "resp_1"), hashed_key("resp", "", "resp_1"), *bookkeeping])
    raw = redis_db.client().get(hashed_key("resp", "alice", "resp_1"))
    assert json.loads(raw)["response"]["id"] == "resp_1"  # type: ignore[arg-type]
    assert not store.delete("bob", "resp_1") and store.delete("alice", "resp_1")
    assert store.get("alice", "resp_1") is None and store.get(None, "resp_1") is not None


def test_responses_expire_with_their_ttl_and_oversized_ones_are_not_stored(redis_db: RedisServer) -> None:
    store = RedisResponseStore(link_to(redis_db), StoreLimits(max_count=10, max_bytes=2000, ttl_seconds=0.3))
    store.put(None, stored("resp_1"))
    ttl_ms = redis_db.client().pttl(hashed_key("resp", "", "resp_1"))
    assert 0 < ttl_ms <= 300
    store.put(None, stored("resp_big", "x" * 5000))
    assert store.get(None, "resp_big") is None
    deadline = time.monotonic() + 5
    while store.get(None, "resp_1") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get(None, "resp_1") is None, "Redis expired it"


def test_each_tenant_has_its_own_share_counted_by_every_replica(redis_db: RedisServer) -> None:
    """Breakage caught: no per-tenant bound in Redis (bob's flood grew without end, or took alice's)."""
    limits = StoreLimits(max_count=3, max_bytes=1200)
    store, replica = (RedisResponseStore(link_to(redis_db), limits) for _ in range(2))
    store.put("alice", stored("resp_alice"))
    for number in range(12):
        (store if number % 2 else replica).put("bob", stored(f"resp_{number}", "x" * 200))
    assert store.get("alice", "resp_alice") is not None
    assert [store.get("bob", f"resp_{n}") is not None for n in (8, 9, 10, 11)] == [False, True, True, True]
    count, total = store.tally("bob")
    assert count == 3 and total == sum(len(encode(stored(f"resp_{n}", "x" * 200))) for n in (9, 10, 11))
    for number in range(30):  # past the bytes before the count
        store.put("bob", stored(f"resp_big{number}", "x" * 400))
    assert store.tally("bob")[1] <= 1200 and store.tally("bob")[0] == 2
    assert store.delete("bob", "resp_big29") and store.tally("bob") == (1, len(encode(stored("resp_big28", "x" * 400))))
    assert store.tally("alice") == (1, len(encode(stored("resp_alice"))))


def test_what_expired_leaves_its_tenants_tally_on_the_next_write(redis_db: RedisServer) -> None:
    clock = [1000.0]
    store = RedisResponseStore(link_to(redis_db), StoreLimits(max_count=3, ttl_seconds=60), clock=lambda: clock[0])
    store.put("bob", stored("resp_1"))
    store.put("bob", stored("resp_2"))
    clock[0] += 61
    store.put("bob", stored("resp_3"))
    assert store.tally("bob") == (1, len(encode(stored("resp_3"))))


def test_a_value_that_is_not_ours_reads_as_absent(redis_db: RedisServer) -> None:
    store = RedisResponseStore(link_to(redis_db))
    redis_db.client().set(hashed_key("resp", "", "resp_1"), b"\x80\x04not json")
    redis_db.client().set(
        hashed_key("resp", "", "resp_2"),
        json.dumps({"response": {"id": "resp_other"}, "input_items": [], "history": []}),
    )
    assert store.get(None, "resp_1") is None and store.get(None, "resp_2") is None


# -- the prompt cache's shared tier -----------------------------------------------------------------


def test_cache_entries_round_trip_per_model_with_a_ttl_each_hit_renews(redis_db: RedisServer) -> None:
    link = link_to(redis_db)
    store = RedisCacheStore(link, "model-a", ttl_seconds=60, max_bytes=10_000)
    other_model = RedisCacheStore(link, "model-b", ttl_seconds=60, max_bytes=10_000)
    value = cache_codec.encode(answer("x"))
    assert store.put("k1", value)
    assert store.get("k1") == value and other_model.get("k1") is None, "two models never share answers"
    client = redis_db.client()
    client.pexpire(store.key("k1"), 5_000)
    store.get("k1")
    assert client.pttl(store.key("k1")) > 50_000, "a hit renews the entry's TTL"
    assert not store.put("big", b"x" * 10_001) and store.get("big") is None
    short = RedisCacheStore(link, "model-a", ttl_seconds=0.2, max_bytes=10_000)
    short.put("k2", value)
    deadline = time.monotonic() + 5
    while client.exists(short.key("k2")) and time.monotonic() < deadline:  # a get would renew it
        time.sleep(0.05)
    assert short.get("k2") is None


async def test_two_caches_on_one_redis_share_answers(redis_db: RedisServer) -> None:
    """Replica A generates and stores; replica B replays it without a generation of its own."""
    errors: list[str] = []
    link = link_to(redis_db)

    def replica() -> tuple[PromptCache, RedisSharedCache]:
        metrics, _ = trio.open_memory_channel[MetricsEvent](math.inf)
        cache = PromptCache(ResponseStore[CachedResponse](8, 100_000), metrics, clock=trio.current_time)
        shared = RedisSharedCache(RedisCacheStore(link, "m", 60, 100_000), errors.append)
        cache.share(shared)
        return cache, shared

    (a, shared_a), (b, shared_b) = replica(), replica()
    generation_a, generation_b = ScriptedGeneration(["Hel", "lo"], finish="stop"), ScriptedGeneration(["no"])
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        send, receive = trio.open_memory_channel[StreamEvent](64)
        a.open("k1", "r1", send, trio.current_time(), 64, generation_a.start)  # type: ignore[arg-type]
        await finish_once_started(generation_a)
        first = await drain(receive)
        with trio.fail_after(5):
            while redis_db.client().dbsize() == 0:  # the write is in the background
                await trio.sleep(0.01)
        send, receive = trio.open_memory_channel[StreamEvent](64)
        b.open("k1", "r2", send, trio.current_time(), 64, generation_b.start)  # type: ignore[arg-type]
        with trio.fail_after(5):
            second = await drain(receive)
        a.close()
        b.close()
    assert isinstance(first[0], StreamStarted) and first[0].cache == "MISS"
    assert isinstance(second[0], StreamStarted) and second[0].cache == "HIT"
    assert generation_b.starts == 0, "B replayed A's answer"
    assert [e.text for e in second if isinstance(e, StreamToken)] == ["Hel", "lo"]
    done = second[-1]
    assert isinstance(done, StreamDone) and done.request_id == "r2" and done.finish_reason == "stop"
    assert shared_a.misses == 1 and shared_b.hits == 1 and b.stats.entries == 1, "B keeps it in memory too"
    assert errors == []


# -- outages ----------------------------------------------------------------------------------------


async def test_an_outage_is_a_miss_and_a_skipped_write_counted_and_redis_back_works_again(
    redis_db: RedisServer,
) -> None:
    reported: list[str] = []
    link = link_to(redis_db)
    cache = RedisSharedCache(RedisCacheStore(link, "m", 60, 100_000), reported.append)
    responses = AsyncResponseStore(RedisResponseStore(link), concurrency=2, report=reported.append)
    await cache.put("k1", answer("a"))
    assert await responses.put(None, stored("resp_1"))
    redis_db.kill()
    assert await cache.get("k1") is None, "down: a miss"
    await cache.put("k2", answer("b"))  # skipped, no raise
    assert not await responses.put(None, stored("resp_2"))
    with pytest.raises(StoreUnavailable):
        await responses.get(None, "resp_1")
    with pytest.raises(StoreUnavailable):
        await responses.delete(None, "resp_1")
    assert reported == ["cache_get", "cache_put", "responses_put", "responses_get", "responses_delete"]
    assert not link.up
    redis_db.start()  # empty: nothing was saved
    await cache.put("k1", answer("a"))
    found = await cache.get("k1")
    assert found is not None and found.tokens[0].text == "a", "the link reconnects by itself"
    assert await responses.put(None, stored("resp_1")) and await responses.get(None, "resp_1") is not None
    assert link.up and len(reported) == 5


def test_after_a_failure_calls_fail_at_once_until_the_pause_ends(redis_db: RedisServer) -> None:
    now = [0.0]
    link = RedisLink(connect(redis_db.url, 0.5), pause_seconds=1.0, clock=lambda: now[0])
    attempts: list[str] = []

    def failing(client: object) -> None:
        attempts.append("tried")
        raise ConnectionError("refused")

    with pytest.raises(RedisUnavailable):
        link.call("cache_get", failing)
    with pytest.raises(RedisUnavailable) as skipped:
        link.call("cache_put", failing)
    assert attempts == ["tried"] and skipped.value.op == "cache_put", "inside the pause nothing is tried"
    now[0] = 1.5
    assert link.call("cache_get", lambda client: client.ping())
    assert link.up


async def test_a_prompt_cache_whose_shared_tier_is_down_generates_and_the_client_never_notices(
    redis_db: RedisServer,
) -> None:
    reported: list[str] = []
    metrics, _ = trio.open_memory_channel[MetricsEvent](math.inf)
    cache = PromptCache(ResponseStore[CachedResponse](8, 100_000), metrics, clock=trio.current_time)
    cache.share(RedisSharedCache(RedisCacheStore(link_to(redis_db), "m", 60, 100_000), reported.append))
    redis_db.kill()
    generation = ScriptedGeneration(["ok"], finish="stop")
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        send, receive = trio.open_memory_channel[StreamEvent](64)
        cache.open("k1", "r1", send, trio.current_time(), 64, generation.start)  # type: ignore[arg-type]
        await finish_once_started(generation)
        with trio.fail_after(5):
            events = await drain(receive)
        with trio.fail_after(5):
            while len(reported) < 2:
                await trio.sleep(0.01)
        cache.close()
    assert isinstance(events[0], StreamStarted) and events[0].cache == "MISS"
    assert isinstance(events[-1], StreamDone) and not any(isinstance(e, StreamError) for e in events)
    assert reported == ["cache_get", "cache_put"] and cache.stats.entries == 1, "still cached in memory"


# -- the actor with a shared tier that answers slowly (no Redis needed) ----------------------------


class GatedShared:
    """A shared tier whose lookups wait for ``release``: requests can arrive, or leave, meanwhile."""

    def __init__(self, entries: dict[str, CachedResponse]) -> None:
        self.entries = entries
        self.release = trio.Event()
        self.lookups = 0
        self.hits = 0
        self.misses = 0
        self.written: list[str] = []

    async def get(self, key: str) -> CachedResponse | None:
        self.lookups += 1
        await self.release.wait()
        return self.entries.get(key)

    async def put(self, key: str, response: CachedResponse) -> None:
        self.written.append(key)


def gated_cache(shared: GatedShared) -> PromptCache:
    metrics, _ = trio.open_memory_channel[MetricsEvent](math.inf)
    cache = PromptCache(ResponseStore[CachedResponse](8, 100_000), metrics, clock=trio.current_time)
    cache.share(shared)
    return cache


@pytest.mark.parametrize("in_shared", [True, False])
async def test_requests_that_arrive_during_a_shared_lookup_wait_for_it_and_share_its_outcome(in_shared: bool) -> None:
    shared = GatedShared({"k1": answer("x")} if in_shared else {})
    cache = gated_cache(shared)
    generation = ScriptedGeneration(["y"], finish="stop")
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        channels = []
        for request_id in ("r1", "r2"):
            send, receive = trio.open_memory_channel[StreamEvent](64)
            cache.open("k1", request_id, send, trio.current_time(), 64, generation.start)  # type: ignore[arg-type]
            channels.append(receive)
        await trio.sleep(0.01)
        assert shared.lookups == 1 and generation.starts == 0, "one lookup for both; nothing generates yet"
        shared.release.set()
        if not in_shared:
            await finish_once_started(generation)
        with trio.fail_after(5):
            first, second = [await drain(receive) for receive in channels]
        await trio.sleep(0.01)
        cache.close()
    statuses = [events[0].cache for events in (first, second) if isinstance(events[0], StreamStarted)]
    assert statuses == (["HIT", "HIT"] if in_shared else ["MISS", "HIT"])
    assert generation.starts == (0 if in_shared else 1)
    assert all(isinstance(events[-1], StreamDone) for events in (first, second))
    assert shared.written == ([] if in_shared else ["k1"]), "only a generated answer is written back"
    assert cache.stats.entries == 1


async def test_a_request_that_leaves_during_the_shared_lookup_starts_nothing() -> None:
    shared = GatedShared({})
    cache = gated_cache(shared)
    generation = ScriptedGeneration(["y"])
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        send, _ = trio.open_memory_channel[StreamEvent](64)
        subscriber = cache.open("k1", "r1", send, trio.current_time(), 64, generation.start)  # type: ignore[arg-type]
        await trio.sleep(0.01)
        cache.leave("k1", subscriber)
        await trio.sleep(0.01)
        shared.release.set()
        await trio.sleep(0.01)
        cache.close()
    assert generation.starts == 0 and cache.flights == 0


async def test_when_the_first_request_leaves_during_the_lookup_the_one_that_joined_still_gets_its_answer() -> None:
    shared = GatedShared({})
    cache = gated_cache(shared)
    generation = ScriptedGeneration(["y"], finish="stop")
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        first_send, _ = trio.open_memory_channel[StreamEvent](64)
        first = cache.open("k1", "r1", first_send, trio.current_time(), 64, generation.start)  # type: ignore[arg-type]
        second_send, second = trio.open_memory_channel[StreamEvent](64)
        cache.open("k1", "r2", second_send, trio.current_time(), 64, generation.start)  # type: ignore[arg-type]
        await trio.sleep(0.01)
        cache.leave("k1", first)
        await trio.sleep(0.01)
        shared.release.set()
        await finish_once_started(generation)
        with trio.fail_after(5):
            events = await drain(second)
        cache.close()
    assert [e.text for e in events if isinstance(e, StreamToken)] == ["y"]
    assert isinstance(events[-1], StreamDone) and events[-1].request_id == "r2"


async def test_a_redis_that_hangs_costs_a_timeout_not_a_stuck_request(redis_db: RedisServer) -> None:
    """SIGSTOP: connections stay open and nothing answers; the socket timeout ends the call."""
    reported: list[str] = []
    link = RedisLink(connect(redis_db.url, 0.2))
    cache = RedisSharedCache(RedisCacheStore(link, "m", 60, 100_000), reported.append)
    await cache.put("k1", answer("a"))
    assert redis_db.process is not None
    redis_db.process.send_signal(signal.SIGSTOP)
    try:
        with trio.fail_after(10):
            assert await cache.get("k1") is None
            assert await cache.get("k1") is None  # within the pause: not tried at all
    finally:
        redis_db.process.send_signal(signal.SIGCONT)
    assert reported == ["cache_get", "cache_get"]

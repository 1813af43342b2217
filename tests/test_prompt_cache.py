"""The response store (pure) and the prompt cache actor with a scripted generation."""

from __future__ import annotations

import math

import pytest
import trio

from actors.cached_response import CachedResponse
from actors.messages import (
    StreamDone,
    StreamError,
    StreamEvent,
    StreamStarted,
    StreamToken,
    Timings,
    Usage,
)
from actors.metrics_events import CacheLookup, MetricsEvent
from actors.prompt_cache import PromptCache
from app.cache.store import ResponseStore


def test_store_evicts_least_recently_used_by_bytes_and_by_entries() -> None:
    store = ResponseStore[str](max_entries=3, max_bytes=100)
    store.put("a", "A", 40)
    store.put("b", "B", 40)
    assert store.get("a") == "A"  # a is now the most recent
    store.put("c", "C", 40)  # 120 bytes: b goes
    assert store.keys() == ["a", "c"] and store.evictions == 1
    store.put("d", "D", 10)
    store.put("e", "E", 10)  # 4 entries: a goes
    assert store.keys() == ["c", "d", "e"] and store.stats().bytes == 60
    assert not store.put("huge", "X", 101)
    assert store.stats().entries == 3


def test_store_replacing_a_key_keeps_the_byte_count_right() -> None:
    store = ResponseStore[str](max_entries=5, max_bytes=100)
    store.put("a", "A", 40)
    store.put("a", "A2", 30)
    assert store.stats().bytes == 30 and store.get("a") == "A2"


class ScriptedGeneration:
    """Stands in for relay + scheduler: emits a fixed stream when told, counts starts and aborts."""

    def __init__(self, texts: list[str], finish: str = "length") -> None:
        self.texts = texts
        self.finish = finish
        self.starts = 0
        self.aborts = 0
        self.out: trio.MemorySendChannel[StreamEvent] | None = None

    def start(self, out: trio.MemorySendChannel[StreamEvent]) -> object:
        self.starts += 1
        self.out = out
        out.send_nowait(StreamStarted("leader"))

        def abort(reason: str) -> None:
            self.aborts += 1
            self.finish_now("cancelled")

        return abort

    def emit_tokens(self, count: int | None = None) -> None:
        assert self.out is not None
        for index, text in enumerate(self.texts[:count]):
            self.out.send_nowait(StreamToken(text, 100 + index, index))

    def finish_now(self, reason: str | None = None) -> None:
        assert self.out is not None
        usage = Usage(3, len(self.texts))
        done = StreamDone("leader", reason or self.finish, usage, Timings(1.0, 2.0, 3.0, 4.0))  # type: ignore[arg-type]
        try:
            self.out.send_nowait(done)
            self.out.close()
        except trio.ClosedResourceError:
            pass


async def open_and_read(
    cache: PromptCache, generation: ScriptedGeneration, request_id: str
) -> tuple[trio.MemoryReceiveChannel[StreamEvent], int]:
    send, receive = trio.open_memory_channel[StreamEvent](64)
    subscriber = cache.open("k1", request_id, send, trio.current_time(), 64, generation.start)  # type: ignore[arg-type]
    return receive, subscriber


async def drain(receive: trio.MemoryReceiveChannel[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in receive]


def make_cache(
    max_entries: int = 8, max_bytes: int = 10_000
) -> tuple[PromptCache, trio.MemoryReceiveChannel[MetricsEvent]]:
    metrics_send, metrics_receive = trio.open_memory_channel[MetricsEvent](math.inf)
    store = ResponseStore[CachedResponse](max_entries, max_bytes)
    return PromptCache(store, metrics_send, clock=trio.current_time), metrics_receive


async def test_a_repeat_is_replayed_without_a_generation() -> None:
    cache, metrics = make_cache()
    generation = ScriptedGeneration(["Hel", "lo"])
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        first, _ = await open_and_read(cache, generation, "r1")
        await trio.sleep(0.01)
        generation.emit_tokens()
        generation.finish_now()
        first_events = await drain(first)
        second, _ = await open_and_read(cache, generation, "r2")
        second_events = await drain(second)
        cache.close()
    assert generation.starts == 1
    assert isinstance(first_events[0], StreamStarted) and first_events[0].cache == "MISS"
    assert isinstance(second_events[0], StreamStarted) and second_events[0].cache == "HIT"
    texts = [[e.text for e in events if isinstance(e, StreamToken)] for events in (first_events, second_events)]
    assert texts[0] == texts[1] == ["Hel", "lo"]
    assert all(e.request_id == "r2" for e in second_events if not isinstance(e, StreamToken))
    replayed = [e for e in second_events if isinstance(e, StreamToken)]
    assert all(
        a is b for a, b in zip(replayed, [e for e in first_events if isinstance(e, StreamToken)], strict=True)
    ), "a replay hands out the stored token objects: it copies nothing"
    done = second_events[-1]
    assert isinstance(done, StreamDone) and done.usage.completion_tokens == 2 and done.timings.queue_ms == 0.0
    assert cache.stats.hits == 1 and cache.stats.misses == 1 and cache.stats.entries == 1
    lookups = []
    while True:
        try:
            event = metrics.receive_nowait()
        except trio.WouldBlock:
            break
        if isinstance(event, CacheLookup):
            lookups.append(event.hit)
    assert lookups == [False, True]


async def test_identical_requests_in_flight_share_one_generation() -> None:
    cache, _ = make_cache()
    generation = ScriptedGeneration(["a", "b", "c", "d"])
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        leader, _ = await open_and_read(cache, generation, "r1")
        await trio.sleep(0.01)
        generation.emit_tokens(2)
        await trio.sleep(0.01)
        follower, _ = await open_and_read(cache, generation, "r2")  # joins after two tokens
        await trio.sleep(0.01)
        assert generation.out is not None
        generation.out.send_nowait(StreamToken("c", 102, 2))
        generation.out.send_nowait(StreamToken("d", 103, 3))
        generation.finish_now()
        leader_events, follower_events = await drain(leader), await drain(follower)
        cache.close()
    assert generation.starts == 1
    for events in (leader_events, follower_events):
        assert "".join(e.text for e in events if isinstance(e, StreamToken)) == "abcd"
    assert isinstance(follower_events[0], StreamStarted) and follower_events[0].cache == "HIT"
    assert cache.stats.hits == 1 and cache.stats.misses == 1


async def test_a_cancelled_generation_is_never_stored_and_only_the_last_leave_aborts() -> None:
    cache, _ = make_cache()
    generation = ScriptedGeneration(["a", "b"])
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        _, one = await open_and_read(cache, generation, "r1")
        await trio.sleep(0.01)
        _, two = await open_and_read(cache, generation, "r2")
        await trio.sleep(0.01)
        cache.leave("k1", one)
        await trio.sleep(0.01)
        assert generation.aborts == 0, "someone still reads it"
        cache.leave("k1", two)
        cache.leave("k1", two)  # idempotent
        await trio.sleep(0.01)
        assert generation.aborts == 1
        await trio.sleep(0.01)
        third, _ = await open_and_read(cache, generation, "r3")
        await trio.sleep(0.01)
        generation.emit_tokens()
        generation.finish_now()
        third_events = await drain(third)
        cache.close()
    assert generation.starts == 2, "the aborted generation was not stored: the next request generated again"
    assert isinstance(third_events[-1], StreamDone) and third_events[-1].finish_reason == "length"


@pytest.mark.parametrize("reason", ["cancelled", "timeout", "shutdown"])
async def test_unfinished_generations_are_not_stored(reason: str) -> None:
    cache, _ = make_cache()
    generation = ScriptedGeneration(["a"], finish=reason)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        first, _ = await open_and_read(cache, generation, "r1")
        await trio.sleep(0.01)
        generation.emit_tokens()
        generation.finish_now()
        await drain(first)
        await trio.sleep(0.01)
        assert cache.stats.entries == 0
        cache.close()


async def test_lru_eviction_by_bytes_in_the_actor() -> None:
    cache, _ = make_cache(max_entries=10, max_bytes=600)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        for i in range(4):
            generation = ScriptedGeneration(["x" * 100])
            send, receive = trio.open_memory_channel[StreamEvent](64)
            cache.open(f"key{i}", f"r{i}", send, trio.current_time(), 64, generation.start)  # type: ignore[arg-type]
            await trio.sleep(0.01)
            generation.emit_tokens()
            generation.finish_now()
            await drain(receive)
            await trio.sleep(0.01)
        cache.close()
    # Each entry is 100 text bytes and its objects (about 400 bytes): only one fits in 600.
    assert cache.cached_keys() == ["key3"] and cache.stats.evictions == 3


class BrokenStore(ResponseStore[CachedResponse]):
    """A store whose lookup of one key raises, like a bug in the cache's own code."""

    def get(self, key: str) -> CachedResponse | None:
        if key == "broken":
            raise RuntimeError("lookup failed")
        return super().get(key)


async def test_a_fault_handling_one_request_fails_that_request_and_the_actor_goes_on() -> None:
    metrics_send, _ = trio.open_memory_channel[MetricsEvent](math.inf)
    cache = PromptCache(BrokenStore(8, 10_000), metrics_send, clock=trio.current_time)
    generation = ScriptedGeneration(["ok"])
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        send, broken = trio.open_memory_channel[StreamEvent](64)
        cache.open("broken", "r1", send, trio.current_time(), 64, generation.start)  # type: ignore[arg-type]
        with trio.fail_after(5):
            broken_events = await drain(broken)
        working, _ = await open_and_read(cache, generation, "r2")
        await trio.sleep(0.01)
        generation.emit_tokens()
        generation.finish_now()
        with trio.fail_after(5):
            working_events = await drain(working)
        cache.close()
    assert len(broken_events) == 1 and isinstance(broken_events[0], StreamError)
    assert broken_events[0].code == "cache_failed" and broken_events[0].request_id == "r1"
    assert "lookup failed" not in broken_events[0].message, "the exception's text stays in the log"
    assert isinstance(working_events[-1], StreamDone) and generation.starts == 1

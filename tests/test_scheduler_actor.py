"""GpuScheduler with a fake backend, in the event loop, on trio's virtual clock."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import pytest
import trio

from actors.messages import (
    Admitted,
    Failed,
    Finished,
    Queued,
    Rejected,
    SchedulerEvent,
    Submit,
    TokenOut,
)
from actors.metrics_events import MetricsEvent, RequestFinished
from actors.scheduler import GpuScheduler
from actors.step_thread import StepCaller
from app.config import Profile
from app.contract.sampling import SamplingParams
from tests.fakes import FakeBackend, inline_steps

STOP = 999_999
T = TypeVar("T")


def make_scheduler(
    backend: FakeBackend,
    *,
    max_batch: int = 4,
    max_queue: int = 8,
    chunk: int = 64,
    max_context: int = 4096,
    step_caller: StepCaller | None = None,
) -> tuple[GpuScheduler, trio.MemoryReceiveChannel[MetricsEvent]]:
    metrics_send, metrics_receive = trio.open_memory_channel[MetricsEvent](math.inf)
    profile = Profile("test", max_batch, max_queue, chunk, 2, arrival_window_ms=0)
    caller = step_caller or inline_steps(0.01)
    scheduler = GpuScheduler(backend, profile, max_context, metrics_send, step_caller=caller, clock=trio.current_time)
    return scheduler, metrics_receive


def submit(
    scheduler: GpuScheduler,
    request_id: str,
    prompt: tuple[int, ...] = (1, 2, 3),
    max_tokens: int = 5,
    deadline: float | None = None,
    **params: object,
) -> trio.MemoryReceiveChannel[SchedulerEvent]:
    send, receive = trio.open_memory_channel[SchedulerEvent](max_tokens + 8)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)  # type: ignore[arg-type]
    scheduler.submit(Submit(request_id, prompt, sampling, frozenset({STOP}), trio.current_time(), send, deadline))
    return receive


async def drain(receive: trio.MemoryReceiveChannel[SchedulerEvent]) -> list[SchedulerEvent]:
    events = []
    async for event in receive:
        events.append(event)
    return events


def tokens_of(events: list[SchedulerEvent]) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenOut)]


async def test_one_request_runs_to_length() -> None:
    backend = FakeBackend()
    scheduler, _ = make_scheduler(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        events = await drain(submit(scheduler, "a", prompt=(10, 11), max_tokens=4))
        scheduler.close()
    kinds = [type(e) for e in events]
    assert kinds == [Queued, Admitted, TokenOut, TokenOut, TokenOut, TokenOut, Finished]
    assert tokens_of(events) == [10, 11, 12, 13]
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert (finished.reason, finished.prompt_tokens, finished.completion_tokens) == ("length", 2, 4)
    last = events[-2]
    assert isinstance(last, TokenOut) and last.finish_reason == "length"
    await trio.sleep(0.1)
    assert backend.seqs == {}, "a finished sequence's row is released"


async def test_stop_token_ends_with_stop_and_is_flagged() -> None:
    backend = FakeBackend(stop_token=STOP, stop_after=2)
    scheduler, _ = make_scheduler(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        events = await drain(submit(scheduler, "a", max_tokens=10))
        scheduler.close()
    tokens = [e for e in events if isinstance(e, TokenOut)]
    assert [t.token_id for t in tokens] == [1, 2, STOP]
    assert tokens[-1].is_stop_token and tokens[-1].finish_reason == "stop"
    assert isinstance(events[-1], Finished) and events[-1].reason == "stop"


async def test_ignore_eos_keeps_going_past_stop_tokens() -> None:
    backend = FakeBackend(stop_token=STOP, stop_after=1)
    scheduler, _ = make_scheduler(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        ignoring = await drain(submit(scheduler, "a", max_tokens=4, ignore_eos=True))
        scheduler.close()
    assert isinstance(ignoring[-1], Finished) and ignoring[-1].reason == "length"
    assert tokens_of(ignoring) == [1, STOP, STOP, STOP]


async def test_min_tokens_ignores_stop_tokens_until_reached() -> None:
    """Breakage caught: the scheduler ending at a stop token below min_tokens (its check removed)."""
    backend = FakeBackend(stop_token=STOP, stop_after=1)
    scheduler, _ = make_scheduler(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        held = await drain(submit(scheduler, "a", max_tokens=10, min_tokens=3))
        plain = await drain(submit(scheduler, "b", max_tokens=10))
        scheduler.close()
    assert tokens_of(held) == [1, STOP, STOP], "the stop token counts once min_tokens are out"
    assert isinstance(held[-1], Finished) and held[-1].reason == "stop" and held[-1].completion_tokens == 3
    assert tokens_of(plain) == [1, STOP] and isinstance(plain[-1], Finished) and plain[-1].reason == "stop"


async def test_batch_is_capped_and_requests_join_as_rows_free(autojump_clock: object) -> None:
    backend = FakeBackend()
    scheduler, _ = make_scheduler(backend, max_batch=2)
    results: dict[str, list[SchedulerEvent]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        channels = {name: submit(scheduler, name, prompt=(i * 100,), max_tokens=3) for i, name in enumerate("abcd")}

        async def collect(name: str) -> None:
            results[name] = await drain(channels[name])

        async with trio.open_nursery() as readers:
            for name in channels:
                readers.start_soon(collect, name)
        scheduler.close()
    assert all(isinstance(events[-1], Finished) for events in results.values())
    assert max(len(ids) for kind, ids in backend.log if kind == "decode") == 2
    # c and d could only join after a and b left.
    admitted = {name: next(e.at for e in events if isinstance(e, Admitted)) for name, events in results.items()}
    finished = {name: events[-1].at for name, events in results.items()}
    assert admitted["c"] >= min(finished["a"], finished["b"])
    assert tokens_of(results["c"]) == [200, 201, 202]


async def test_full_queue_rejects_with_429_and_retry_after() -> None:
    backend = FakeBackend()
    scheduler, _ = make_scheduler(backend, max_batch=1, max_queue=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        first = submit(scheduler, "a", max_tokens=50)
        second = submit(scheduler, "b", max_tokens=50)
        third = submit(scheduler, "c", max_tokens=50)
        rejected = await drain(third)
        scheduler.abort("a", "client_disconnect")
        scheduler.abort("b", "client_disconnect")
        await drain(first)
        await drain(second)
        scheduler.close()
    assert len(rejected) == 1 and isinstance(rejected[0], Rejected)
    assert rejected[0].status == 429 and rejected[0].retry_after is not None and rejected[0].retry_after >= 1


async def test_abort_running_frees_row_before_next_step_and_is_idempotent() -> None:
    backend = FakeBackend()
    scheduler, metrics = make_scheduler(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        channel = submit(scheduler, "a", max_tokens=1000)
        other = submit(scheduler, "b", max_tokens=1000)
        seen = 0
        async for event in channel:
            if isinstance(event, TokenOut):
                seen += 1
                if seen == 3:
                    scheduler.abort("a", "client_disconnect")
                    scheduler.abort("a", "client_disconnect")
            if isinstance(event, Finished):
                assert event.reason == "cancelled"
                break
        steps_at_abort = len(backend.log)
        await trio.sleep(0.05)
        assert "a" in backend.released
        later_decodes = [ids for kind, ids in backend.log[steps_at_abort:] if kind == "decode"]
        assert later_decodes and all("a" not in ids for ids in later_decodes)
        scheduler.abort("a", "client_disconnect")  # after it finished: still fine
        scheduler.abort("b", "client_disconnect")
        await drain(other)
        scheduler.close()
    finished = finished_metrics(metrics)
    assert sorted(e.reason for e in finished) == ["cancelled", "cancelled"]
    assert all(e.teardown_seconds is not None and e.teardown_seconds >= 0 for e in finished)
    assert all(e.abort_reason == "client_disconnect" for e in finished)
    a_finished = next(e for e in finished if e.request_id == "a")
    assert a_finished.teardown_steps is not None and a_finished.teardown_steps <= 1, "freed before the next step"


async def test_an_abort_that_arrives_during_a_step_gets_no_token_from_that_step() -> None:
    """Breakage caught: an abort that came in while a step ran applied only on the next trip, so
    its client gets one more token after the abort (the row is still freed on that next trip:
    ``teardown_steps <= 1`` holds either way)."""
    backend = FakeBackend()
    aborted_with: list[int] = []  # the tokens the backend had made for "a" when its client left

    async def abort_mid_step(fn: Callable[[], T]) -> T:
        await trio.sleep(0.01)
        outcome = fn()  # the step has run in the "worker thread"; the scheduler has not seen it yet
        seq = backend.seqs.get("a")
        if seq is not None and seq.generated == 3 and not aborted_with:
            aborted_with.append(seq.generated)
            scheduler.abort("a", "client_disconnect")
        return outcome

    scheduler, metrics = make_scheduler(backend, step_caller=abort_mid_step)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        channel = submit(scheduler, "a", max_tokens=1000)
        other = submit(scheduler, "b", prompt=(50, 2, 3), max_tokens=6)
        events = await drain(channel)
        assert tokens_of(await drain(other)) == [50, 51, 52, 53, 54, 55], "the other stream goes on"
        scheduler.close()
    assert aborted_with == [3]
    assert tokens_of(events) == [1, 2], "the third token came from the step the abort arrived in"
    assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled"
    (finished,) = [e for e in finished_metrics(metrics) if e.request_id == "a"]
    assert finished.teardown_steps == 1, "the step in flight ran; the row was freed before the next"


async def test_abort_while_queued_never_reaches_the_backend() -> None:
    backend = FakeBackend()
    scheduler, _ = make_scheduler(backend, max_batch=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        running = submit(scheduler, "a", max_tokens=20)
        queued = submit(scheduler, "b", max_tokens=20)
        scheduler.abort("b", "client_disconnect")
        events = await drain(queued)
        await drain(running)
        scheduler.close()
    assert [type(e) for e in events] == [Queued, Finished]
    assert all("b" not in ids for _, ids in backend.log)


def finished_metrics(metrics: trio.MemoryReceiveChannel[MetricsEvent]) -> list[RequestFinished]:
    found: list[RequestFinished] = []
    while True:
        try:
            metric = metrics.receive_nowait()
        except trio.WouldBlock:
            return found
        if isinstance(metric, RequestFinished):
            found.append(metric)


async def test_relay_gone_counts_as_disconnect() -> None:
    """Breakage caught: a vanished relay taken for a stall (abort reason "stalled", also "cancelled")."""
    backend = FakeBackend()
    scheduler, metrics = make_scheduler(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        channel = submit(scheduler, "a", max_tokens=1000)
        await channel.receive()  # Queued
        channel.close()  # the relay went away without a word
        await trio.sleep(0.2)
        assert scheduler.stats.running == 0
        assert backend.seqs == {}
        scheduler.close()
    (finished,) = finished_metrics(metrics)
    assert (finished.reason, finished.abort_reason) == ("cancelled", "client_disconnect")
    assert finished.teardown_steps is not None and finished.teardown_steps <= 1


async def test_a_failing_step_fails_only_its_requests() -> None:
    def fail(kind: str, ids: list[str]) -> Exception | None:
        return RuntimeError("boom") if kind == "prefill" and "bad" in ids else None

    backend = FakeBackend(fail=fail)
    scheduler, _ = make_scheduler(backend, max_batch=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        good = submit(scheduler, "good", max_tokens=5)
        good_events = []
        async for event in good:  # let "good" finish its prefill alone first
            good_events.append(event)
            if isinstance(event, TokenOut):
                break
        bad = await drain(submit(scheduler, "bad", max_tokens=5))
        good_events += await drain(good)
        after = await drain(submit(scheduler, "after", prompt=(7,), max_tokens=2))
        scheduler.close()
    assert isinstance(bad[-1], Failed) and bad[-1].code == "step_failed"  # "boom" goes to the log only
    assert isinstance(good_events[-1], Finished) and good_events[-1].reason == "length"
    assert tokens_of(after) == [7, 8]
    assert "bad" not in backend.seqs


async def test_deadline_ends_with_timeout(autojump_clock: object) -> None:
    backend = FakeBackend()
    scheduler, _ = make_scheduler(backend, max_batch=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        events = await drain(submit(scheduler, "a", max_tokens=10_000, deadline=trio.current_time() + 0.5))
        queued_events = await drain(submit(scheduler, "q", max_tokens=10, deadline=trio.current_time() - 1))
        scheduler.close()
    assert isinstance(events[-1], Finished) and events[-1].reason == "timeout"
    assert 0 < len(tokens_of(events)) < 10_000
    assert isinstance(queued_events[-1], Finished) and queued_events[-1].reason == "timeout"


async def test_long_prompts_prefill_in_chunks_while_others_decode(autojump_clock: object) -> None:
    backend = FakeBackend()
    scheduler, _ = make_scheduler(backend, chunk=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        short = submit(scheduler, "short", prompt=(1,), max_tokens=30)
        await short.receive()
        long = submit(scheduler, "long", prompt=tuple(range(1, 21)), max_tokens=2)
        long_events = await drain(long)
        await drain(short)
        scheduler.close()
    assert isinstance(long_events[-1], Finished)
    prefills_of_long = [ids for kind, ids in backend.log if kind == "prefill" and "long" in ids]
    assert len(prefills_of_long) == 5  # 20 tokens in chunks of 4
    # Between long's prefill chunks, the short sequence kept decoding.
    first = backend.log.index(("prefill", ("long",)))
    window = backend.log[first : first + 8]
    assert any(kind == "decode" and "short" in ids for kind, ids in window)


async def test_close_fails_what_is_left() -> None:
    backend = FakeBackend()
    scheduler, _ = make_scheduler(backend, max_batch=1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            a = submit(scheduler, "a", max_tokens=100_000)
            b = submit(scheduler, "b", max_tokens=10)
            await a.receive()
            scheduler.close()
            a_events = await drain(a)
            b_events = await drain(b)
    assert isinstance(a_events[-1], Failed) and isinstance(b_events[-1], Failed)


@pytest.mark.parametrize(
    "reason,finish",
    [("stop_string", "stop"), ("shutdown", "shutdown"), ("relay_error", "error"), ("stalled", "cancelled")],
)
async def test_abort_reasons_map_to_finish_reasons(reason: str, finish: str) -> None:
    backend = FakeBackend()
    scheduler, _ = make_scheduler(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        channel = submit(scheduler, "a", max_tokens=1000)
        await channel.receive()
        scheduler.abort("a", reason)  # type: ignore[arg-type]
        events = await drain(channel)
        scheduler.close()
    assert isinstance(events[-1], Finished) and events[-1].reason == finish


async def test_an_out_of_memory_step_is_retried_split_in_two() -> None:
    from app.contract.step import StepOutOfMemory

    def too_big(kind: str, ids: list[str]) -> Exception | None:
        return StepOutOfMemory("CUDA out of memory") if kind == "decode" and len(ids) > 2 else None

    backend = FakeBackend(fail=too_big)
    scheduler, _ = make_scheduler(backend, max_batch=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        channels = [submit(scheduler, name, prompt=(i * 10,), max_tokens=4) for i, name in enumerate("abcd")]
        results = [await drain(channel) for channel in channels]
        scheduler.close()
    assert all(isinstance(events[-1], Finished) and events[-1].reason == "length" for events in results)
    assert [tokens_of(events) for events in results] == [
        [0, 1, 2, 3],
        [10, 11, 12, 13],
        [20, 21, 22, 23],
        [30, 31, 32, 33],
    ]
    assert ("free_cached_memory", ()) in backend.log
    assert any(kind == "decode" and len(ids) == 2 for kind, ids in backend.log)


async def test_a_sequence_that_never_fits_fails_alone() -> None:
    from app.contract.step import StepOutOfMemory

    def huge(kind: str, ids: list[str]) -> Exception | None:
        return StepOutOfMemory("CUDA out of memory") if "huge" in ids else None

    backend = FakeBackend(fail=huge)
    scheduler, _ = make_scheduler(backend, max_batch=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        small = submit(scheduler, "small", max_tokens=6)
        await small.receive()
        big = await drain(submit(scheduler, "huge", max_tokens=6))
        small_events = await drain(small)
        scheduler.close()
    assert isinstance(big[-1], Failed) and big[-1].code == "out_of_memory"
    assert isinstance(small_events[-1], Finished) and small_events[-1].reason == "length"


async def test_steps_that_keep_failing_mark_the_scheduler_degraded() -> None:
    broken = {"on": True}

    def fail(kind: str, ids: list[str]) -> Exception | None:
        return RuntimeError("device lost") if broken["on"] else None

    backend = FakeBackend(fail=fail)
    scheduler, _ = make_scheduler(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        for i in range(3):
            events = await drain(submit(scheduler, f"f{i}", max_tokens=3))
            assert isinstance(events[-1], Failed)
        await trio.sleep(0.05)
        assert scheduler.stats.degraded
        broken["on"] = False
        events = await drain(submit(scheduler, "ok", max_tokens=3))
        await trio.sleep(0.05)
        assert isinstance(events[-1], Finished) and not scheduler.stats.degraded
        scheduler.close()


async def test_an_idle_batch_waits_briefly_for_arrivals_before_its_first_prefill(autojump_clock: object) -> None:
    backend = FakeBackend()
    metrics_send, _ = trio.open_memory_channel[MetricsEvent](math.inf)
    profile = Profile("test", 8, 16, 64, 2, arrival_window_ms=10)
    scheduler = GpuScheduler(
        backend, profile, 4096, metrics_send, step_caller=inline_steps(0.05), clock=trio.current_time
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        first = submit(scheduler, "a", max_tokens=2)
        await trio.sleep(0.005)  # within the window
        second = submit(scheduler, "b", max_tokens=2)
        await drain(first)
        await drain(second)
        scheduler.close()
    prefills = [ids for kind, ids in backend.log if kind == "prefill"]
    assert prefills[0] == ("a", "b"), "both prompts went into the first prefill"


async def test_the_teardown_is_measured_once_the_row_is_freed(autojump_clock: object) -> None:
    """Breakage caught: the teardown observed when the abort is handled, before the row is freed
    (its histogram's help says abort to row freed)."""
    freed_at: dict[str, float] = {}

    class TimedBackend(FakeBackend):
        def release(self, seq_id: str) -> None:
            freed_at[seq_id] = trio.current_time()
            super().release(seq_id)

    backend = TimedBackend()
    scheduler, metrics = make_scheduler(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        channel = submit(scheduler, "a", max_tokens=1000)
        async for event in channel:
            if isinstance(event, TokenOut) and event.index == 2:
                aborted_at = trio.current_time()
                scheduler.abort("a", "client_disconnect")
        scheduler.close()
    (finished,) = finished_metrics(metrics)
    assert finished.teardown_seconds is not None
    assert aborted_at + finished.teardown_seconds >= freed_at["a"] > aborted_at


async def test_a_forked_submit_reaches_the_backend_as_a_fork_of_its_parent() -> None:
    """Breakage caught: the scheduler dropping Submit.fork_from (the child prefills its whole
    prompt again) or naming to the backend a parent that is not there (a cache hit's id)."""
    backend = FakeBackend()
    scheduler, _ = make_scheduler(backend)
    sampling = SamplingParams(max_tokens=3, temperature=0.0)
    channels = []
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        for name, parent in [("p", None), ("c", "p"), ("orphan", "a-cache-hit")]:
            send, receive = trio.open_memory_channel[SchedulerEvent](16)
            now = trio.current_time()
            scheduler.submit(Submit(name, (5, 6, 7), sampling, frozenset({STOP}), now, send, fork_from=parent))
            channels.append(receive)
        outputs = [tokens_of(await drain(receive)) for receive in channels]
        scheduler.close()
    assert backend.forks == [("c", "p")]
    assert outputs == [[5, 6, 7]] * 3
    assert ("prefill", ("p", "orphan")) in backend.log and ("prefill", ("c",)) in backend.log

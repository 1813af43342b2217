"""The pipeline's life: its actors start in order, drain and stop in order, with a fake model."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from actors.messages import GenerationJob, StreamDone, StreamError, StreamEvent, StreamToken
from actors.pipeline import NotReadyError, Pipeline
from actors.stream_handle import StreamHandle
from actors.streams import RELAY_BUFFER_EVENTS
from app.config import ServerConfig
from app.contract.model import CallSyntax, MemoryPool
from app.contract.sampling import SamplingDefaults, SamplingParams
from tests.fakes import FakeBackend, inline_steps


@dataclass
class FakeModel:
    runner: FakeBackend = field(default_factory=FakeBackend)
    model_id: str = "fake"
    aliases: tuple[str, ...] = ()
    model_size: str = "0m"
    dtype: str = "float32"
    device: str = "cpu"
    max_context: int = 100_000
    harmony: bool = False
    stop_token_ids: frozenset[int] = frozenset({999_999})
    tokenizer: Any = None
    decode_path: str = "dynamic"
    memory_pools: tuple[MemoryPool, ...] = ()
    grammars: None = None
    max_token_bytes: int = 16
    tool_call_syntax: CallSyntax | None = None
    vocab_size: int = 1000
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + token % 26) for token in token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode([token_id]).encode()


async def test_stop_fails_the_running_streams_before_it_cancels_anything() -> None:
    """A request still running when the pipeline stops gets an error event that says so.

    Breakage caught: closing the inboxes and cancelling the nursery at once (the scheduler never
    gets to fail what it holds, and the stream just ends, ``stream_lost``).
    """
    pipeline = Pipeline(FakeModel, ServerConfig(model="fake", cache_max_entries=0), step_caller=inline_steps(0.01))
    events: list[StreamEvent] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(pipeline.run, wait_for_model=True))
            job = GenerationJob((1, 2, 3), SamplingParams(max_tokens=100_000, temperature=0.0), trio.current_time())
            handle = pipeline.open_stream(job)
            async for event in handle:
                events.append(event)
                if isinstance(event, StreamToken) and event.index == 2:
                    break
            stopping = trio.Event()

            async def stop() -> None:
                await pipeline.stop()
                stopping.set()

            nursery.start_soon(stop)
            async for event in handle:
                events.append(event)
            await stopping.wait()
    last = events[-1]
    assert isinstance(last, StreamError) and last.code == "scheduler_stopped", last
    assert pipeline.active_relays == 0


async def _first_tokens(handle: StreamHandle, count: int) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    async for event in handle:
        events.append(event)
        if isinstance(event, StreamToken) and event.index == count - 1:
            break
    return events


def _job(max_tokens: int) -> GenerationJob:
    return GenerationJob((1, 2, 3), SamplingParams(max_tokens=max_tokens, temperature=0.0), trio.current_time())


@asynccontextmanager
async def _streaming(
    step_seconds: float, max_tokens: int
) -> AsyncIterator[tuple[Pipeline, StreamHandle, trio.Nursery]]:
    """A running pipeline (steps of ``step_seconds``) and one stream, past its first token."""
    config = ServerConfig(model="fake", cache_max_entries=0)
    pipeline = Pipeline(FakeModel, config, step_caller=inline_steps(step_seconds))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(pipeline.run, wait_for_model=True))
            handle = pipeline.open_stream(_job(max_tokens))
            await _first_tokens(handle, 1)
            yield pipeline, handle, nursery
            await pipeline.stop()


async def test_drain_refuses_new_streams_and_ends_the_running_ones_with_shutdown() -> None:
    """SIGTERM's drain: new work is refused at once; a stream still running at the deadline ends
    with a done event (finish_reason ``shutdown``), and the drain returns once it has.

    Breakage caught: cancelling the relays at the deadline (the stream would end ``stream_lost``),
    or a drain that waits on its own for the streams instead of ending them.
    """
    async with _streaming(0.01, 100_000) as (pipeline, handle, nursery):
        drained = trio.Event()

        async def drain() -> None:
            await pipeline.drain(0.3, grace=2.0)
            drained.set()

        began = trio.current_time()
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()  # the drain has begun
        assert pipeline.state == "draining"
        with pytest.raises(NotReadyError):
            pipeline.open_stream(_job(4))
        events = [event async for event in handle]
        await drained.wait()
        took = trio.current_time() - began
        assert pipeline.active_relays == 0
    last = events[-1]
    assert isinstance(last, StreamDone) and last.finish_reason == "shutdown", last
    assert 0.3 <= took < 2.0, took


async def test_drain_returns_as_soon_as_the_running_streams_finish() -> None:
    """A stream that ends on its own before the deadline ends as it would have (``length``), and
    the drain does not wait out its timeout."""
    events: list[StreamEvent] = []
    async with _streaming(0.01, 20) as (pipeline, handle, nursery):

        async def read_rest() -> None:
            events.extend([event async for event in handle])

        nursery.start_soon(read_rest)
        began = trio.current_time()
        await pipeline.drain(20.0)
        took = trio.current_time() - began
    last = events[-1]
    assert isinstance(last, StreamDone) and last.finish_reason == "length", last
    assert took < 5.0, took


async def test_drain_cancels_a_relay_whose_reader_never_takes_its_end() -> None:
    """The relays' nursery gets the drain deadline (Hypercorn's handler nursery does the same with
    graceful_timeout): a relay still blocked on a reader that does not read when the grace is over
    is cancelled, its reader sees the stream end, and nothing of the drain is left running.

    Breakage caught: a drain that returns with the relay still running, for stop to find.
    """
    async with _streaming(0.0005, 100_000) as (pipeline, handle, _):
        while pipeline.scheduler is not None and pipeline.scheduler.stats.steps < RELAY_BUFFER_EVENTS + 20:
            await trio.sleep(0.01)  # the relay's buffer fills up: it now waits on its reader
        began = trio.current_time()
        await pipeline.drain(0.1, grace=0.2)
        took = trio.current_time() - began
        assert pipeline.active_relays == 0
        events = [event async for event in handle]
    assert 0.3 <= took < 2.0, took
    assert isinstance(events[-1], StreamToken), events[-1]  # then the channel ended: no done came

"""The pipeline's life: its actors start in order and stop in order, with a fake model."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from actors.messages import GenerationJob, StreamError, StreamEvent, StreamToken
from actors.pipeline import Pipeline
from app.config import ServerConfig
from app.contract.model import CallSyntax, MemoryPool
from app.contract.sampling import SamplingParams
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

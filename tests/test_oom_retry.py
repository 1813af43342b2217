"""Out of memory in a real model step: the scheduler splits the batch and retries, on the tiny gpt-oss.

A forward pre-hook raises ``torch.cuda.OutOfMemoryError`` (what the CUDA allocator raises; the
runner maps it to StepOutOfMemory) whenever a decode step holds more than two rows. The scheduler
must retry the step as two halves that fit, and the answers must be plain generate()'s token for
token: the failed forward may have written keys for some layers before it raised, and those must
be overwritten, never read.

Breakage caught: no split (every request fails "out of memory"); halves that do not partition the
batch (a sequence decoded twice, or skipped: its tokens differ); a failed forward that advances a
sequence's length (its next keys land one position off: the tokens differ from generate()).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import trio

from actors.messages import Failed, Finished, SchedulerEvent, Submit, TokenOut
from actors.metrics_events import MetricsEvent
from actors.scheduler import GpuScheduler
from app.config import Profile
from app.contract.sampling import SamplingParams
from app.engine.loader import ModelWeights
from app.engine.runner import ModelRunner
from tests.fakes import inline_steps
from tests.test_engine import random_prompts, reference_greedy

MAX_ROWS_THAT_FIT = 2


async def scheduled(runner: ModelRunner, prompts: dict[str, list[int]], n: int) -> dict[str, list[SchedulerEvent]]:
    """Each prompt's events, greedy, n tokens, through a real scheduler over ``runner``."""
    metrics, _ = trio.open_memory_channel[MetricsEvent](math.inf)
    profile = Profile("test", max_batch_size=4, max_queue=8, prefill_chunk_tokens=512, max_consecutive_prefills=2)
    scheduler = GpuScheduler(runner, profile, 4096, metrics, step_caller=inline_steps(0.0), clock=trio.current_time)
    greedy = SamplingParams(max_tokens=n, temperature=0.0)
    events: dict[str, list[SchedulerEvent]] = {}
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            channels = {}
            for name, prompt in prompts.items():
                send, receive = trio.open_memory_channel[SchedulerEvent](n + 8)
                scheduler.submit(Submit(name, tuple(prompt), greedy, frozenset(), trio.current_time(), send))
                channels[name] = receive
            for name, receive in channels.items():
                events[name] = [event async for event in receive]
            scheduler.close()
    return events


def tokens(events: list[SchedulerEvent]) -> list[int]:
    return [event.token_id for event in events if isinstance(event, TokenOut)]


async def test_an_out_of_memory_decode_is_split_and_gives_generates_tokens(tiny_weights: ModelWeights) -> None:
    n = 10
    prompts = random_prompts(4, 199_000, seed=5)
    expected = {name: reference_greedy(tiny_weights, prompt, n) for name, prompt in prompts.items()}
    runner = ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])
    rows_seen: list[int] = []
    refused: list[int] = []

    def too_big(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        rows = int(kwargs["input_ids"].shape[0])
        rows_seen.append(rows)
        if rows > MAX_ROWS_THAT_FIT:
            refused.append(rows)
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected: {rows} rows)")

    hook = tiny_weights.model.register_forward_pre_hook(too_big, with_kwargs=True)
    try:
        events = await scheduled(runner, prompts, n)
    finally:
        hook.remove()
    out = {name: tokens(got) for name, got in events.items()}
    finished = {name: got[-1] for name, got in events.items()}
    assert refused, "a decode step of more than two rows was attempted and refused"
    assert rows_seen.count(2) == 2 * len(refused), "each refused step ran again as two halves of two rows"
    assert all(isinstance(event, Finished) and event.reason == "length" for event in finished.values()), finished
    assert out == expected, "the split halves give generate()'s tokens: the failed forward left nothing behind"
    assert runner.sequence_ids() == [] and runner.kv_cache_bytes == 0


async def test_running_out_of_memory_while_the_cache_grows_is_split_and_retried_too(tiny_weights: ModelWeights) -> None:
    """The cache grows (reserve) before a prefill's forward; an OOM there went around the split
    and failed every request in the step. Now it is a StepOutOfMemory like the forward's: the
    halves are tried, and only the sequence that cannot fit fails.

    Breakage caught: the reserve outside the runner's out-of-memory mapping (both requests failed
    with step_failed)."""
    n = 6
    prompts = {"long": random_prompts(4, 199_000, seed=9)["s3"][:60], "short": [1000, 2000, 3000, 4000, 5000]}
    expected_short = reference_greedy(tiny_weights, prompts["short"], n)
    runner = ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])
    real_reserve = runner._rows.reserve

    def reserve(rows: int, positions: int) -> None:
        if positions > 40:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected: {positions} positions)")
        real_reserve(rows, positions)

    runner._rows.reserve = reserve  # type: ignore[method-assign]
    events = await scheduled(runner, prompts, n)
    failed = events["long"][-1]
    assert isinstance(failed, Failed) and failed.code == "out_of_memory", events["long"][-1]
    assert tokens(events["short"]) == expected_short
    assert runner.sequence_ids() == [] and runner.kv_cache_bytes == 0

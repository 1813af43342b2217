"""A client that goes away mid-request stops its generation within one model step, leaving nothing behind.

These servers step slowly (50 ms a step, tests.fakes.slow_steps): a disconnect is noticed within
milliseconds, so "within one step" is then a count that does not depend on how busy the machine
is. Each bound is in model steps and tokens, never in seconds.

Breakage each test catches: the scheduler acting on an abort 25 steps late (an abort kept in a
countdown before it is applied) generates ~28 tokens after the client left and reports a teardown
of 25 steps; an abort that never reaches the scheduler leaves the sequence running.
"""

from __future__ import annotations

import functools
from typing import Any

import httpx
import trio

from app.engine.loader import ModelWeights
from app.engine.runner import ModelRunner
from tests.conftest import RunningServer, running_server, stream_then_drop, wait_for_stats
from tests.fakes import slow_steps

STEP_SECONDS = 0.05
# The step in flight when the client left may finish; so may one more token already in the socket's
# buffers that the client never read. Anything beyond is work for a client that is gone.
MAX_TOKENS_AFTER_LEAVING = 2


def runner_of(server: RunningServer) -> ModelRunner:
    model = server.server.pipeline.model
    assert model is not None
    return model.runner  # type: ignore[return-value]


def figures(stats: dict[str, Any]) -> dict[str, Any]:
    return stats["model_metrics"]["tiny-gpt-oss"]


def torn_down(count: int) -> Any:
    """/stats once ``count`` cancellations are counted, nothing runs, and every row is freed."""

    def check(stats: dict[str, Any]) -> bool:
        return bool(
            stats["cancelled_requests"] == count
            and stats["active_sequences"] == 0
            and figures(stats)["cancel_teardown_steps"]["count"] == count
        )

    return check


async def test_dropping_a_stream_frees_its_row_relay_and_task_within_one_step(tiny_weights: ModelWeights) -> None:
    async with (
        running_server(tiny_weights, step_caller=slow_steps(STEP_SECONDS)) as server,
        server.client() as client,
    ):
        pipeline = server.server.pipeline
        baseline_tasks = pipeline.task_count
        read = await stream_then_drop(client, {"prompt": "tell me everything", "max_tokens": 5000}, 3)
        assert read == 3
        stats = await wait_for_stats(client, torn_down(1), server=server)
        after_drop = figures(stats)
        assert after_drop["client_disconnects"] == 1
        generated = after_drop["tokens"]["completion"]
        assert generated - read <= MAX_TOKENS_AFTER_LEAVING, f"{generated} tokens generated for 3 read"
        assert after_drop["cancel_teardown_steps"]["max"] <= 1, after_drop["cancel_teardown_steps"]
        await trio.sleep(5 * STEP_SECONDS)
        later = figures((await client.get("/stats")).json())
        assert later["tokens"]["completion"] == generated, "nothing keeps generating for a client that is gone"
        assert pipeline.active_relays == 0
        assert pipeline.task_count == baseline_tasks
        runner = runner_of(server)
        assert runner.sequence_ids() == [] and runner.free_rows == runner.max_batch_size  # every row free
        assert after_drop["cancel_teardown_ms"]["p50"] is not None
        ok = await client.post("/generate", json={"prompt": "still there?", "max_tokens": 3, "stream": False})
        assert ok.status_code == 200


async def test_dropping_a_non_stream_request_cancels_it_within_one_step(tiny_weights: ModelWeights) -> None:
    async with (
        running_server(tiny_weights, step_caller=slow_steps(STEP_SECONDS)) as server,
        server.client() as client,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(client.post, "/generate", json={"prompt": "x", "max_tokens": 5000, "stream": False})
            )
            await wait_for_stats(client, lambda s: s["active_sequences"] == 1 and figures(s)["tokens"]["completion"])
            nursery.cancel_scope.cancel()  # the client gives up: its connection closes
        stats = await wait_for_stats(client, torn_down(1), server=server)
        assert figures(stats)["cancel_teardown_steps"]["max"] <= 1, figures(stats)["cancel_teardown_steps"]
        assert server.server.pipeline.active_relays == 0
        assert runner_of(server).sequence_ids() == []


async def test_dropping_one_stream_leaves_the_others_running(tiny_weights: ModelWeights) -> None:
    async with (
        running_server(tiny_weights, step_caller=slow_steps(STEP_SECONDS)) as server,
        server.client() as client,
    ):
        results: dict[str, int] = {}

        async def full(name: str) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as own:
                response = await own.post("/generate", json={"prompt": name, "max_tokens": 20, "stream": False})
                results[name] = response.json()["usage"]["completion_tokens"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(full, "a")
            nursery.start_soon(full, "b")
            read = await stream_then_drop(client, {"prompt": "c", "max_tokens": 5000}, 1)
        assert results == {"a": 20, "b": 20}
        stats = await wait_for_stats(client, torn_down(1), server=server)
        generated_for_c = figures(stats)["tokens"]["completion"] - 2 * 20
        assert generated_for_c - read <= MAX_TOKENS_AFTER_LEAVING, f"{generated_for_c} tokens for c, {read} read"
        assert figures(stats)["cancel_teardown_steps"]["max"] <= 1

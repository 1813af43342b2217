"""A client that goes away mid-request stops its generation within a step, leaving nothing behind."""

from __future__ import annotations

import functools

import httpx
import trio

from app.engine.loader import ModelWeights
from app.engine.runner import ModelRunner
from tests.conftest import RunningServer, running_server, stream_then_drop, wait_for_stats


def runner_of(server: RunningServer) -> ModelRunner:
    model = server.server.pipeline.model
    assert model is not None
    return model.runner  # type: ignore[return-value]


async def test_dropping_a_stream_frees_its_row_relay_and_task(tiny_weights: ModelWeights) -> None:
    async with running_server(tiny_weights) as server, server.client() as client:
        pipeline = server.server.pipeline
        baseline_tasks = pipeline.task_count
        assert await stream_then_drop(client, {"prompt": "tell me everything", "max_tokens": 5000}, 3) == 3
        dropped_at = trio.current_time()
        stats = await wait_for_stats(client, lambda s: s["cancelled_requests"] == 1 and s["active_sequences"] == 0)
        seconds = trio.current_time() - dropped_at
        figures = stats["model_metrics"]["tiny-gpt-oss"]
        assert figures["client_disconnects"] == 1
        assert seconds < 2.0
        generated = figures["tokens"]["completion"]
        assert generated < 5000
        await trio.sleep(0.2)
        after = (await client.get("/stats")).json()["model_metrics"]["tiny-gpt-oss"]
        assert after["tokens"]["completion"] == generated, "nothing keeps generating for a client that is gone"
        assert pipeline.active_relays == 0
        assert pipeline.task_count == baseline_tasks
        runner = runner_of(server)
        assert runner.sequence_ids() == [] and runner.kv_cache_bytes == 0
        assert figures["cancel_teardown_ms"]["p50"] is not None
        ok = await client.post("/generate", json={"prompt": "still there?", "max_tokens": 3, "stream": False})
        assert ok.status_code == 200


async def test_dropping_a_non_stream_request_cancels_it(tiny_weights: ModelWeights) -> None:
    async with running_server(tiny_weights) as server, server.client() as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(client.post, "/generate", json={"prompt": "x", "max_tokens": 5000, "stream": False})
            )
            await wait_for_stats(client, lambda s: s["active_sequences"] == 1)
            nursery.cancel_scope.cancel()  # the client gives up: its connection closes
        await wait_for_stats(client, lambda s: s["cancelled_requests"] == 1 and s["active_sequences"] == 0)
        assert server.server.pipeline.active_relays == 0
        assert runner_of(server).sequence_ids() == []


async def test_dropping_one_stream_leaves_the_others_running(tiny_weights: ModelWeights) -> None:
    async with running_server(tiny_weights) as server, server.client() as client:
        results: dict[str, int] = {}

        async def full(name: str) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as own:
                response = await own.post("/generate", json={"prompt": name, "max_tokens": 40, "stream": False})
                results[name] = response.json()["usage"]["completion_tokens"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(full, "a")
            nursery.start_soon(full, "b")
            await stream_then_drop(client, {"prompt": "c", "max_tokens": 5000}, 1)
        assert results == {"a": 40, "b": 40}
        stats = await wait_for_stats(client, lambda s: s["active_sequences"] == 0)
        assert stats["cancelled_requests"] == 1

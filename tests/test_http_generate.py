"""POST /generate, /health and /stats against a real Hypercorn in this process (tiny gpt-oss)."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import trio
from httpx_sse import aconnect_sse

from app.engine.loader import ModelWeights
from tests.conftest import RunningServer, running_server, server_config


async def stream_events(client: httpx.AsyncClient, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    events = []
    async with aconnect_sse(client, "POST", "/generate", json=body) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for sse in source.aiter_sse():
            events.append((sse.event, json.loads(sse.data)))
    return events


async def test_health_reports_the_model(tiny_server: RunningServer) -> None:
    async with tiny_server.client() as client:
        response = await client.get("/health")
    body = response.json()
    assert response.status_code == 200
    assert body["status"] == "ok"
    assert body["model_id"] == "tiny-gpt-oss"
    assert body["model_size"] == "13m"
    assert body["dtype"] == "float32" and body["device"] == "cpu"
    assert body["profile"] == "latency_first" and body["max_context"] == 8192


async def test_stream_has_start_then_tokens_then_done(tiny_server: RunningServer) -> None:
    with trio.fail_after(30):
        async with tiny_server.client() as client:
            events = await stream_events(client, {"prompt": "Hello there", "max_tokens": 6, "temperature": 0})
    names = [name for name, _ in events]
    assert names == ["start"] + ["token"] * 6 + ["done"]
    start = events[0][1]
    assert start["model"] == "tiny-gpt-oss" and start["request_id"] and isinstance(start["created"], int)
    tokens = [data for name, data in events if name == "token"]
    assert [t["index"] for t in tokens] == list(range(6))
    assert all(isinstance(t["text"], str) and isinstance(t["token_id"], int) for t in tokens)
    done = events[-1][1]
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 6 and done["usage"]["prompt_tokens"] == start["prompt_tokens"]
    timings = done["timings"]
    assert 0 <= timings["queue_ms"] <= timings["ttft_ms"] <= timings["e2e_ms"]


async def test_non_stream_matches_stream_text(tiny_server: RunningServer) -> None:
    body = {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 8, "temperature": 0}
    async with tiny_server.client() as client:
        events = await stream_events(client, body)
        response = await client.post("/generate", json={**body, "stream": False}, headers={"X-Request-Id": "abc-123"})
    result = response.json()
    assert response.status_code == 200
    assert response.headers["X-Request-Id"] == "abc-123" and result["request_id"] == "abc-123"
    streamed = "".join(data["text"] for name, data in events if name == "token")
    assert result["text"] == streamed
    assert result["finish_reason"] == "length"
    assert result["usage"] == {
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": 8,
        "total_tokens": result["prompt_tokens"] + 8,
        # The streamed run's answer, replayed by the prompt cache: no prompt token was prefilled.
        "cached_tokens": result["prompt_tokens"],
    }
    assert result["cached"] is True
    assert set(result["timings"]) == {"queue_ms", "prefill_ms", "ttft_ms", "e2e_ms"}


async def test_text_parts_and_unknown_fields_are_accepted(tiny_server: RunningServer) -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        "max_tokens": 2,
        "stream": False,
        "some_client_extension": {"x": 1},
    }
    async with tiny_server.client() as client:
        response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text


async def test_bad_input_gets_clear_errors(tiny_server: RunningServer) -> None:
    async with tiny_server.client() as client:
        cases = [
            (await client.post("/generate", content=b"{not json"), 400, None),
            (await client.post("/generate", json=[1, 2]), 400, "body"),
            (await client.post("/generate", json={"prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
            (await client.post("/generate", json={"prompt": "x", "max_tokens": 0}), 400, "max_tokens"),
            (await client.post("/generate", json={"prompt": "x", "temperature": 3}), 400, "temperature"),
            (await client.post("/generate", json={"max_tokens": 3}), 400, "messages"),
            (
                await client.post("/generate", json={"messages": [{"role": "robot", "content": "x"}]}),
                400,
                "messages.0.role",
            ),
            (await client.post("/generate", json={"prompt": "x", "model": "gpt-9"}), 404, "model"),
            (await client.post("/generate", json={"prompt": "x " * 9000, "max_tokens": 5}), 400, "messages"),
            (await client.post("/generate", json={"prompt": "x", "max_tokens": 8192}), 400, "max_tokens"),
            (await client.post("/generate", content=b"{" + b" " * (5 * 1024 * 1024) + b"}"), 413, None),
            (await client.get("/no/such/thing"), 404, None),
            (await client.post("/generate", json={"prompt": "x", "presence_penalty": 2.5}), 400, "presence_penalty"),
            (await client.post("/generate", json={"prompt": "x", "repetition_penalty": 0}), 400, "repetition_penalty"),
        ]
    for response, status, param in cases:
        assert response.status_code == status, (response.status_code, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"]
        if param is not None:
            assert error["param"] == param, error
    too_long = cases[9][0].json()["error"]
    assert too_long["code"] == "context_length_exceeded" and too_long["message"].startswith(
        "This model's maximum context length is 8192 tokens. However, you requested"
    )
    assert "8192 in the completion" in too_long["message"]
    assert all(isinstance(r.json()["error"]["code"], str | None) for r, _, _ in cases), "a string or null"


async def test_health_answers_while_a_step_is_running(tiny_weights: ModelWeights) -> None:
    """/health does not wait for the model: it answers while a step is held in its worker thread.

    Breakage caught: a step run on the event loop (or /health waiting on the step limiter) would
    leave /health unanswered until the step is let go.
    """
    step_started, let_go = threading.Event(), threading.Event()

    async def held_steps(fn: Callable[[], Any]) -> Any:
        def held() -> Any:
            step_started.set()
            if not let_go.wait(30):
                raise RuntimeError("the test never let the step go")
            return fn()

        return await trio.to_thread.run_sync(held)

    async with (
        running_server(tiny_weights, step_caller=held_steps) as server,
        server.client() as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(
            functools.partial(client.post, "/generate", json={"prompt": "go", "max_tokens": 3, "stream": False})
        )
        await trio.to_thread.run_sync(step_started.wait, 30)
        health = [await client.get("/health") for _ in range(3)]
        still_held = not let_go.is_set()
        let_go.set()
    assert still_held and all(response.status_code == 200 for response in health)
    assert all(response.json()["status"] == "ok" for response in health)


async def test_concurrent_greedy_requests_match_their_solo_runs(tiny_weights: ModelWeights) -> None:
    prompts = ["first prompt", "a second and somewhat longer prompt " * 8, "third", "the fourth one, also long " * 6]
    async with running_server(tiny_weights) as server, server.client() as client:

        async def run(prompt: str, max_tokens: int) -> list[int]:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "cache": False}
            events = await stream_events(client, body)
            return [data["token_id"] for name, data in events if name == "token"]

        solo = [await run(p, 20) for p in prompts]
        together: dict[int, list[int]] = {}

        async def staggered(i: int) -> None:
            await trio.sleep(0.05 * i)  # join mid-flight
            together[i] = await run(prompts[i], 20 + 5 * (i % 2))

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(staggered, i)
    for i in range(len(prompts)):
        assert together[i][:20] == solo[i]


async def test_seeded_sampling_over_http_is_repeatable(tiny_server: RunningServer) -> None:
    body = {
        "prompt": "roll the dice",
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 1234,
        "stream": False,
        "cache": False,
    }
    async with tiny_server.client() as client:
        first = (await client.post("/generate", json=body)).json()["text"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(client.post, "/generate", json={"prompt": "noise", "max_tokens": 30, "stream": False})
            )
            second = (await client.post("/generate", json=body)).json()["text"]
        third = (await client.post("/generate", json={**body, "seed": 4321})).json()["text"]
    assert first == second
    assert third != first


async def test_stop_strings_end_the_text(tiny_server: RunningServer) -> None:
    async with tiny_server.client() as client:
        full = (
            await client.post("/generate", json={"prompt": "abc", "max_tokens": 12, "temperature": 0, "stream": False})
        ).json()
        stop = full["text"][len(full["text"]) // 2 :][:3]
        cut = (
            await client.post(
                "/generate", json={"prompt": "abc", "max_tokens": 12, "temperature": 0, "stream": False, "stop": [stop]}
            )
        ).json()
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full["text"][: full["text"].find(stop)]


async def test_queue_overflow_is_refused_with_429(tiny_weights: ModelWeights) -> None:
    import dataclasses

    from app.config import PROFILES

    profile = dataclasses.replace(PROFILES["latency_first"], max_batch_size=1, max_queue=1)
    async with running_server(tiny_weights, server_config(profile=profile)) as server, server.client() as client:
        statuses: list[int] = []
        headers: list[httpx.Headers] = []

        async def call() -> None:
            response = await client.post("/generate", json={"prompt": "x", "max_tokens": 200, "stream": False})
            statuses.append(response.status_code)
            headers.append(response.headers)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(call)
    # One running, one queued (the bound counts beyond the free rows), the other two refused at once.
    assert sorted(statuses) == [200, 200, 429, 429], statuses
    refused = [h for s, h in zip(statuses, headers, strict=True) if s == 429]
    assert all(int(h["Retry-After"]) >= 1 for h in refused)


async def test_every_response_says_where_it_came_from(tiny_server: RunningServer) -> None:
    body = {"prompt": "cache me", "max_tokens": 6, "temperature": 0, "stream": False}
    async with tiny_server.client() as client:
        first = await client.post("/generate", json=body)
        second = await client.post("/generate", json=body)
        streamed = await stream_events(client, {**body, "stream": True})
        bypass = await client.post("/generate", json={**body, "cache": False})
        sampled = await client.post("/generate", json={**body, "temperature": 0.9})
    assert [r.headers["X-Cache"] for r in (first, second, bypass, sampled)] == ["MISS", "HIT", "BYPASS", "BYPASS"]
    key = first.headers["X-Cache-Key"]
    assert len(key) == 64 and second.headers["X-Cache-Key"] == key and bypass.headers["X-Cache-Key"] == key
    assert first.headers["X-Prompt-Version"] == "pb-1"
    assert (first.json()["cached"], second.json()["cached"]) == (False, True)
    assert first.json()["text"] == second.json()["text"] == bypass.json()["text"]
    assert first.json()["cache_key"] == key and first.json()["prompt_version"] == "pb-1"
    start = streamed[0][1]
    assert start["cache_key"] == key and start["cached"] is True and start["prompt_version"] == "pb-1"
    assert "".join(d["text"] for name, d in streamed if name == "token") == first.json()["text"]


async def test_repeated_deterministic_requests_hit_the_cache(tiny_server: RunningServer) -> None:
    """The users' acceptance check: 10 distinct requests, 3 times each, hit rate >= 30%."""
    async with tiny_server.client() as client:
        outputs: dict[int, set[str]] = {}
        for _round in range(3):
            for i in range(10):
                body = {"prompt": f"question {i}", "max_tokens": 8, "temperature": 0, "seed": 7, "stream": False}
                outputs.setdefault(i, set()).add((await client.post("/generate", json=body)).json()["text"])
        stats = (await client.get("/stats")).json()["model_metrics"]["tiny-gpt-oss"]["cache"]
    assert all(len(texts) == 1 for texts in outputs.values()), "each repeat gave the same output"
    assert stats["hits"] == 20 and stats["misses"] == 10
    assert stats["hit_rate"] >= 0.3 and stats["entries"] == 10 and stats["bytes"] > 0


async def test_identical_concurrent_requests_share_one_generation(tiny_server: RunningServer) -> None:
    body = {"prompt": "shared", "max_tokens": 40, "temperature": 0, "stream": False}
    async with tiny_server.client() as client:
        results: list[httpx.Response] = []

        async def call() -> None:
            results.append(await client.post("/generate", json=body))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(call)
        stats = (await client.get("/stats")).json()["model_metrics"]["tiny-gpt-oss"]
    assert len({r.json()["text"] for r in results}) == 1
    assert sorted(r.headers["X-Cache"] for r in results) == ["HIT", "HIT", "HIT", "MISS"]
    assert stats["requests"]["total"] == 4 and stats["requests"]["cached"] == 3
    assert stats["tokens"]["completion"] == 40, "one generation served all four"

"""Two server processes on the tiny gpt-oss, both with --redis-url on one real redis-server, behave
as one service: an answer cached through A is a hit on B, a response stored through A is continued
through B; and killing Redis mid-run loses no request that did not need it (those that need a
stored response get 503 service_unavailable), and everything works again once it is back."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.redis_server import RedisServer, redis_server
from tools.server_process import ServedApp, app_on_port_zero

pytestmark = pytest.mark.slow
MODEL = "tiny-gpt-oss"


@dataclass
class Replicas:
    redis: RedisServer
    a: ServedApp
    b: ServedApp


@pytest.fixture(scope="module")
def replicas() -> Iterator[Replicas]:
    with redis_server() as redis, contextlib.ExitStack() as stack:
        args = ("--model", MODEL, "--redis-url", redis.url)
        a = stack.enter_context(app_on_port_zero(*args, ready_timeout=180))
        b = stack.enter_context(app_on_port_zero(*args, ready_timeout=180))
        yield Replicas(redis, a, b)


def chat(url: str, content: str, max_tokens: int = 6, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return httpx.post(f"{url}/v1/chat/completions", json={"temperature": 0, **body, **extra}, timeout=120)


def respond(url: str, text: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "input": text, "max_output_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/responses", json=body, timeout=120)


def stream_chat(url: str, content: str, max_tokens: int, started: threading.Barrier) -> tuple[str | None, bool]:
    """A streamed greedy chat: (its finish reason, whether it ended with [DONE]); meets the others
    at ``started`` once its first token is in."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    finish, done, waited = None, False, False
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, "temperature": 0, "stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choices = json.loads(line[6:])["choices"]
            if not waited:
                started.wait(timeout=60)
                waited = True
            finish = choices[0]["finish_reason"] if choices else finish
    return finish, done


def cache_keys(redis: RedisServer) -> int:
    return len(redis.client().keys("gptoss:v1:cache:*"))


def wait_for_cache_keys(redis: RedisServer, count: int) -> None:
    """The write to Redis follows the answer, in the background."""
    deadline = time.monotonic() + 10
    while cache_keys(redis) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache_keys(redis) >= count


def stats(url: str) -> dict[str, Any]:
    figures: dict[str, Any] = httpx.get(f"{url}/stats", timeout=10).json()["model_metrics"][MODEL]
    return figures


def test_an_answer_cached_through_one_replica_is_a_hit_on_the_other(replicas: Replicas) -> None:
    before = cache_keys(replicas.redis)
    first = chat(replicas.a.url, "Name a colour.")
    assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
    wait_for_cache_keys(replicas.redis, before + 1)
    second = chat(replicas.b.url, "Name a colour.")
    assert second.status_code == 200 and second.headers["X-Cache"] == "HIT", "B replays A's answer"
    assert second.headers["X-Cache-Key"] == first.headers["X-Cache-Key"], "the same key in both processes"
    assert second.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert stats(replicas.b.url)["cache"]["shared"]["hits"] >= 1
    assert stats(replicas.b.url)["tokens"]["completion"] == 0, "B's model generated nothing"
    again = chat(replicas.b.url, "Name a colour.")
    assert again.headers["X-Cache"] == "HIT"


def test_a_response_stored_through_one_replica_is_continued_through_the_other(replicas: Replicas) -> None:
    stored = respond(replicas.a.url, "Remember the number 7.")
    assert stored.status_code == 200
    response_id = stored.json()["id"]
    fetched = httpx.get(f"{replicas.b.url}/v1/responses/{response_id}", timeout=30)
    assert fetched.status_code == 200 and fetched.json()["output"] == stored.json()["output"]
    alone = respond(replicas.b.url, "Which number?")
    continued = respond(replicas.b.url, "Which number?", previous_response_id=response_id)
    assert continued.status_code == 200
    assert continued.json()["usage"]["input_tokens"] > alone.json()["usage"]["input_tokens"], (
        "B's prompt holds the conversation A stored"
    )
    deleted = httpx.delete(f"{replicas.a.url}/v1/responses/{continued.json()['id']}", timeout=30)
    assert deleted.status_code == 200
    assert httpx.get(f"{replicas.b.url}/v1/responses/{continued.json()['id']}", timeout=30).status_code == 404


def test_killing_redis_mid_run_loses_no_request_that_did_not_need_it(replicas: Replicas) -> None:
    stored_id = respond(replicas.a.url, "Keep this.").json()["id"]
    urls = [replicas.a.url, replicas.b.url]
    started = threading.Barrier(5)  # four streams with a token each, and this test
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        # Streams in flight on both replicas (greedy: each looked the cache up, and will write it)...
        running = [pool.submit(stream_chat, urls[i % 2], f"Count slowly to {i}.", 200, started) for i in range(4)]
        started.wait(timeout=60)
        replicas.redis.kill()  # ...when Redis goes
        assert all(not future.done() for future in running), "Redis went while they were generating"
        ended = [future.result() for future in running]
    assert ended == [("length", True)] * 4, "every stream ran to its end"
    after = [chat(url, f"Say {word}.") for url in urls for word in ("yes", "no")]
    assert [response.status_code for response in after] == [200] * 4
    assert [response.headers["X-Cache"] for response in after] == ["MISS"] * 4
    for url in urls:
        plain = respond(url, "Hello.")  # stored nowhere, answered all the same
        assert plain.status_code == 200 and plain.json()["status"] in ("completed", "incomplete")
        for needs_store in (
            respond(url, "And then?", previous_response_id=stored_id),
            httpx.get(f"{url}/v1/responses/{stored_id}", timeout=30),
        ):
            assert needs_store.status_code == 503
            error = needs_store.json()["error"]
            assert error["type"] == "service_unavailable" and error["code"] == "store_unavailable"
            assert "Error" not in error["message"], "our words, not an exception's"
            assert needs_store.headers["Retry-After"] == "1"
        assert sum(stats(url)["redis_errors"].values()) > 0
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "gptoss_redis_errors_total{" in metrics and 'op="cache_get"' in metrics

    replicas.redis.start()  # back, empty (nothing was saved)
    time.sleep(1.1)  # the link's pause after a failure
    first = chat(replicas.a.url, "Back again?")
    assert first.headers["X-Cache"] == "MISS"
    wait_for_cache_keys(replicas.redis, 1)
    assert chat(replicas.b.url, "Back again?").headers["X-Cache"] == "HIT", "both reconnected by themselves"
    again = respond(replicas.b.url, "Stored again.")
    fetched = httpx.get(f"{replicas.a.url}/v1/responses/{again.json()['id']}", timeout=30)
    assert fetched.status_code == 200

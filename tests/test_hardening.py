"""One client can never hurt another, and bad values are refused up front (issue 14).

Each test names the breakage it catches; each failed before the change it tests.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import trio

from app.engine.loader import ModelWeights
from tests.conftest import running_server, server_config, server_in_thread
from tests.fakes import slow_steps


@pytest.fixture(scope="module")
def live(tiny_weights: ModelWeights) -> Iterator[str]:
    """One server for the module's quick checks (its own trio loop, in a thread)."""
    with server_in_thread(tiny_weights) as url:
        yield url


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60)


def stream_tokens(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    """A whole /generate stream: its response headers and its events."""
    with client(url) as http, http.stream("POST", "/generate", json=body, headers=headers) as response:
        text = response.read().decode()
    blocks = [b for b in text.split("\n\n") if b.startswith("event: ")]
    events = [(b.split("\n")[0][7:], json.loads(b.split("\n")[1][6:])) for b in blocks]
    return {"headers": response.headers, "events": events}


def requests_seen(url: str) -> int:
    with client(url) as http:
        return int(http.get("/stats").json()["model_metrics"]["tiny-gpt-oss"]["requests"]["total"])


def test_two_requests_with_one_request_id_do_not_touch_each_other(live: str) -> None:
    """Breakage caught: the client's X-Request-Id used as the internal key (the second request
    joined the first one's sequence: one stream hung, the other got 'already in the runner')."""
    same = {"X-Request-Id": "dup-123"}
    body = {"prompt": "two of us", "max_tokens": 12, "temperature": 0.8, "stream": True}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: stream_tokens(live, body, same), range(2)))
    for result in results:
        names = [name for name, _ in result["events"]]
        assert names == ["start"] + ["token"] * 12 + ["done"], names
        assert result["headers"]["X-Request-Id"] == "dup-123"
        start, done = result["events"][0][1], result["events"][-1][1]
        assert start["request_id"] == "dup-123" and done["request_id"] == "dup-123"


@pytest.mark.parametrize("request_id", [b"", b"x" * 129, b"has space", b'quote"', b"tab\tin", "é".encode("latin-1")])
def test_a_request_id_that_is_not_a_plain_token_is_refused(live: str, request_id: bytes) -> None:
    with client(live) as http:
        response = http.post("/generate", json={"prompt": "x", "max_tokens": 1}, headers={b"X-Request-Id": request_id})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "X-Request-Id" and error["code"] == "invalid_request_id"


BAD_VALUES = [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 2**40}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"frequency_penalty": 9}, "frequency_penalty"),
    ({"repetition_penalty": 1e-30}, "repetition_penalty"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"min_tokens": 10**6}, "min_tokens"),
    ({"stop": ["x" * 257]}, "stop"),
    ({"stop": [str(i) for i in range(9)]}, "stop"),
    ({"timeout": 0}, "timeout"),
]


@pytest.mark.parametrize("fields,param", BAD_VALUES, ids=[param for _, param in BAD_VALUES])
def test_out_of_range_sampling_values_get_a_400_before_any_work(live: str, fields: dict[str, Any], param: str) -> None:
    """Breakage caught: a seed past int64 streamed 'Overflow when unpacking long long' as an error
    event; validation errors came as 422."""
    before = requests_seen(live)
    with client(live) as http:
        response = http.post("/generate", json={"prompt": "x", "max_tokens": 2, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and isinstance(error["code"], str)
    assert requests_seen(live) == before, "refused before it reached the pipeline"


def test_edge_values_that_are_fine_are_served(live: str) -> None:
    """A tiny temperature is greedy (it streamed 'probability tensor contains inf/nan'); any
    int64 seed, a negative one too, is a seed."""
    body = {"prompt": "edge", "max_tokens": 6, "stream": False, "cache": False}
    with client(live) as http:
        greedy = http.post("/generate", json={**body, "temperature": 0})
        tiny = http.post("/generate", json={**body, "temperature": 1e-40})
        seeded = [http.post("/generate", json={**body, "seed": seed}) for seed in (2**63 - 1, -(2**63), -1)]
    assert tiny.status_code == 200 and tiny.json()["text"] == greedy.json()["text"]
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6 for r in seeded), [
        r.text for r in seeded
    ]


HOSTILE_BODIES = [
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
    (b'{"prompt": "x", "seed": ' + b"7" * 4301 + b"}", "digits"),
    (b'{"prompt": "\\ud800", "max_tokens": 2}', "surrogate"),
    (b'{"prompt": "x", "temperature": NaN}', "nan"),
    (b'{"prompt": "x", "temperature": Infinity}', "infinity"),
    (b'{"prompt": "x", "max_tokens": 2, "x": ' + b'{"a": ' * 70 + b"1" + b"}" * 70 + b"}", "deep object"),
    (b"\xff\xfe{}", "not utf-8"),
]


@pytest.mark.parametrize("raw,name", HOSTILE_BODIES, ids=[name for _, name in HOSTILE_BODIES])
def test_hostile_json_gets_a_400_never_a_500(live: str, raw: bytes, name: str) -> None:
    """Breakage caught: RecursionError, the int digit limit and a lone surrogate all became 500s."""
    with client(live) as http:
        for path in ("/generate", "/v1/chat/completions"):
            response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (path, response.status_code, response.text[:200])
            error = response.json()["error"]
            assert error["message"] and error["code"] == "invalid_json", error


def test_a_prompt_far_over_the_context_is_refused_without_tokenizing_it(live: str) -> None:
    """4 MiB on an 8,192-token model is over the context by its size alone (no o200k token is
    longer than 128 bytes): refused at once, without a tokenizer pass."""
    huge = "hello world " * (4 * 1024 * 1024 // 12 - 10)
    with client(live) as http:
        response = http.post("/generate", json={"prompt": huge, "max_tokens": 1})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "at least 32" in error["message"], error


@pytest.mark.parametrize("shape", ["prompt", "messages"])
async def test_health_answers_within_a_second_while_a_4_mib_prompt_is_tokenized(
    tiny_weights: ModelWeights, shape: str
) -> None:
    """On a model whose context admits it by size, a 4 MiB prompt is tokenized (seconds of work),
    off the event loop and with the GIL let go: /health keeps answering.

    Breakage caught: tokenizing on the event loop (every probe waits for all of it), or with
    openai-harmony, which holds the GIL for over a second on 4 MiB."""
    roomy = dataclasses.replace(tiny_weights, max_context=400_000)
    huge = "hello world, " * (4 * 1024 * 1024 // 13 - 10)
    body: dict[str, Any] = {"max_tokens": 1}
    body.update({"prompt": huge} if shape == "prompt" else {"messages": [{"role": "user", "content": huge}]})
    async with running_server(roomy) as running, running.client() as client:
        probes: list[float] = []
        done = trio.Event()
        outcome: dict[str, Any] = {}

        async def big() -> None:
            started = time.perf_counter()
            response = await client.post("/generate", json=body, timeout=120)
            outcome.update(status=response.status_code, error=response.json().get("error"))
            outcome["seconds"] = time.perf_counter() - started
            done.set()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(big)
                await trio.sleep(0.3)  # the body is sent and parsed; tokenizing has begun
                while not done.is_set():
                    started = time.perf_counter()
                    assert (await client.get("/health")).status_code == 200
                    probes.append(time.perf_counter() - started)
                    await trio.sleep(0.1)
    print(f"\n{shape}: tokenized and refused in {outcome['seconds']:.1f} s; /health worst {max(probes) * 1000:.0f} ms")
    assert outcome["status"] == 400 and outcome["error"]["code"] == "context_length_exceeded", outcome
    assert "at least" not in outcome["error"]["message"], "it was tokenized, not refused by its size"
    assert len(probes) >= 3, "the probes ran while the prompt was being tokenized"
    assert max(probes) < 1.0, probes


async def test_open_streams_are_bounded_cache_replays_included(tiny_weights: ModelWeights) -> None:
    """--max-streams 2: a third request gets 429 with Retry-After, also one the prompt cache would
    serve (a cache hit never queues, so --max-queue could not bound it).

    Breakage caught: no bound on open streams (replays bypassed every limit)."""
    config = server_config(max_streams=2)
    async with (
        running_server(tiny_weights, config, step_caller=slow_steps(0.05)) as running,
        running.client() as client,
    ):
        repeat = {"prompt": "popular", "max_tokens": 3, "temperature": 0, "stream": False}
        assert (await client.post("/generate", json=repeat)).status_code == 200  # now stored
        long = {"prompt": "long one", "max_tokens": 200, "stream": True, "cache": False}
        async with client.stream("POST", "/generate", json=long), client.stream("POST", "/generate", json=long):
            refused = [await client.post("/generate", json=repeat), await client.post("/generate", json=long)]
        after = await client.post("/generate", json=repeat)
    for response in refused:
        assert response.status_code == 429 and response.json()["error"]["code"] == "too_many_streams", response.text
        assert int(response.headers["Retry-After"]) >= 1
    assert after.status_code == 200 and after.headers["X-Cache"] == "HIT"


async def test_connections_with_a_request_open_are_bounded_but_probes_answer(tiny_weights: ModelWeights) -> None:
    """--max-connections 2: a third request gets 503 while two streams are open; /health and
    /metrics still answer (an orchestrator must not restart a busy server)."""
    config = server_config(max_connections=2)
    async with (
        running_server(tiny_weights, config, step_caller=slow_steps(0.05)) as running,
        running.client() as client,
    ):
        long = {"prompt": "hold the line", "max_tokens": 200, "cache": False}
        async with client.stream("POST", "/generate", json=long), client.stream("POST", "/generate", json=long):
            refused = await client.post("/generate", json={"prompt": "x", "max_tokens": 1})
            health, metrics = await client.get("/health"), await client.get("/metrics")
        # The two streams' requests end once their teardown has run, a moment after the client
        # closed them: then a new request is served again.
        with trio.move_on_after(5):
            while (
                after := await client.post("/generate", json={"prompt": "x", "max_tokens": 1, "stream": False})
            ).status_code == 503:
                await trio.sleep(0.05)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_connections"
    assert refused.headers["Retry-After"] == "1"
    assert health.status_code == 200 and metrics.status_code == 200
    assert after.status_code == 200


async def test_a_connection_that_never_finishes_its_request_head_is_closed(tiny_weights: ModelWeights) -> None:
    """Slow-loris: a request head sent a byte at a time, never finished, holds a connection for
    the keep-alive timeout (5 s) at most, not for minutes (hypercorn.toml said 75 s)."""
    async with running_server(tiny_weights) as running:
        host, port = running.url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        started = time.perf_counter()
        closed_after = None
        with trio.move_on_after(20):
            for byte in b"POST /generate HTTP/1.1\r\nHost: test\r\nX-Slow: ":
                await stream.send_all(bytes([byte]))
                await trio.sleep(0.1)
            while True:
                try:
                    await stream.send_all(b"a")
                    if await _closed(stream):
                        break
                except trio.BrokenResourceError:
                    break
            closed_after = time.perf_counter() - started
        await stream.aclose()
    assert closed_after is not None and closed_after < 8, closed_after


async def _closed(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(0.5):
        return await stream.receive_some(1024) == b""
    return False


KEYS = ("key-aaaa-1111", "key-bbbb-2222")


async def test_an_api_key_guards_generation_and_keeps_tenants_apart(tiny_weights: ModelWeights) -> None:
    """Breakage caught: no key check at all; a key check that left /v1/models open or shut
    /health; one tenant's cached answer served (and its prompt revealed by X-Cache) to another."""
    async with running_server(tiny_weights, server_config(api_keys=KEYS)) as running, running.client() as client:

        def auth(key: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {key}"}

        greedy = {"prompt": "a secret question", "max_tokens": 3, "temperature": 0, "stream": False}
        missing = await client.post("/generate", json=greedy)
        wrong = await client.post("/generate", json=greedy, headers=auth("key-aaaa-1112"))
        models = await client.get("/v1/models")
        first = await client.post("/generate", json=greedy, headers=auth(KEYS[0]))
        again = await client.post("/generate", json=greedy, headers=auth(KEYS[0]))
        other = await client.post("/generate", json=greedy, headers=auth(KEYS[1]))
        open_paths = [await client.get(path) for path in ("/health", "/metrics", "/stats", "/")]
    for refused in (missing, wrong, models):
        assert refused.status_code == 401, refused.text
        error = refused.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert KEYS[0] not in refused.text and KEYS[1] not in refused.text
    assert [r.headers["X-Cache"] for r in (first, again, other)] == ["MISS", "HIT", "MISS"]
    assert first.headers["X-Cache-Key"] == again.headers["X-Cache-Key"] != other.headers["X-Cache-Key"]
    assert all(r.status_code == 200 for r in open_paths), [r.status_code for r in open_paths]


async def test_the_openai_client_sends_its_key(tiny_weights: ModelWeights) -> None:
    import openai

    async with running_server(tiny_weights, server_config(api_keys=KEYS)) as running:
        good = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key=KEYS[1], max_retries=0)
        bad = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="not-the-key", max_retries=0)
        async with good, bad:
            completion = await good.completions.create(model="tiny-gpt-oss", prompt="Hi", max_tokens=2)
            with pytest.raises(openai.AuthenticationError):
                await bad.completions.create(model="tiny-gpt-oss", prompt="Hi", max_tokens=2)
    assert completion.usage is not None and completion.usage.completion_tokens == 2


async def test_cors_headers_only_for_the_origins_named(tiny_weights: ModelWeights) -> None:
    """Breakage caught: CORS headers for any origin (a page anywhere could call the server with a
    user's browser), or none for an allowed one (its preflight fails)."""
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with running_server(tiny_weights) as plain, plain.client() as client:
        closed = await client.options("/v1/chat/completions", headers=preflight)
    config = server_config(allowed_origins=("https://app.example",), api_keys=KEYS)
    async with running_server(tiny_weights, config) as running, running.client() as client:
        allowed = await client.options("/v1/chat/completions", headers=preflight)
        stranger = await client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        body = {"prompt": "x", "max_tokens": 1, "stream": False}
        actual = await client.post(
            "/generate", json=body, headers={"Origin": "https://app.example", "Authorization": f"Bearer {KEYS[0]}"}
        )
    assert not any(h.lower().startswith("access-control") for h in closed.headers)
    assert allowed.status_code == 200 and allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    assert not any(h.lower().startswith("access-control") for h in stranger.headers)
    assert actual.status_code == 200 and actual.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-Cache" in actual.headers["Access-Control-Expose-Headers"]

"""The official openai client against the server: chat and completions, sync and async, stream and not."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
import trio
from httpx_sse import aconnect_sse
from openai.types.chat import ChatCompletionMessageParam

from app.engine.loader import ModelWeights
from tests.conftest import RunningServer, running_server

HI: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France? Answer in one word."}
]


@pytest.fixture
async def smollm2_server(smollm2_weights: ModelWeights) -> AsyncIterator[RunningServer]:
    from tests.conftest import server_config

    async with running_server(smollm2_weights, server_config(model="smollm2-135m")) as running:
        yield running


def sync_client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


async def test_sync_client_chat_on_smollm2(smollm2_server: RunningServer) -> None:
    def call() -> openai.types.chat.ChatCompletion:
        with sync_client(smollm2_server) as client:
            return client.chat.completions.create(
                model="HuggingFaceTB/SmolLM2-135M-Instruct",
                messages=HI,
                max_tokens=20,
                temperature=0,
            )

    completion = await trio.to_thread.run_sync(call)
    assert completion.object == "chat.completion"
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert completion.model == "HuggingFaceTB/SmolLM2-135M-Instruct"


async def test_penalties_are_applied_and_keyed(smollm2_server: RunningServer) -> None:
    ask = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Write the word cat twenty times."}],
        "max_tokens": 24,
        "temperature": 0,
    }
    async with smollm2_server.client() as client:
        plain = await client.post("/v1/chat/completions", json=ask)
        penalised = await client.post("/v1/chat/completions", json={**ask, "frequency_penalty": 1.5})
        repeated = await client.post("/v1/chat/completions", json={**ask, "frequency_penalty": 1.5})
        extension = await client.post("/v1/chat/completions", json={**ask, "repetition_penalty": 1.5})
    for response in (plain, penalised, repeated, extension):
        assert response.status_code == 200, response.text
    text = [r.json()["choices"][0]["message"]["content"] for r in (plain, penalised, repeated, extension)]
    assert text[0].lower().count("cat") > text[1].lower().count("cat")
    assert text[1] == text[2] and repeated.headers["X-Cache"] == "HIT"  # greedy with penalties: deterministic
    assert text[3] != text[0]
    keys = {r.headers["X-Cache-Key"] for r in (plain, penalised, extension)}
    assert len(keys) == 3


async def test_min_tokens_holds_off_a_real_models_end_and_ignore_eos_runs_to_max(
    smollm2_server: RunningServer,
) -> None:
    """SmolLM2 ends a short answer by itself; min_tokens makes it go on, ignore_eos runs to max_tokens.

    Breakage caught: min_tokens not enforced (the answer still ends at the model's own end token).
    """

    def call(**extra: object) -> openai.types.chat.ChatCompletion:
        with sync_client(smollm2_server) as client:
            return client.chat.completions.create(
                model="smollm2-135m",
                messages=[{"role": "user", "content": "Say hi."}],
                max_tokens=60,
                temperature=0,
                extra_body={"cache": False, **extra},
            )

    plain = await trio.to_thread.run_sync(call)
    assert plain.usage is not None and plain.choices[0].finish_reason == "stop"
    natural = plain.usage.completion_tokens
    assert natural < 30, plain.choices[0].message.content
    held = await trio.to_thread.run_sync(functools.partial(call, min_tokens=natural + 15))
    assert held.usage is not None and held.usage.completion_tokens >= natural + 15
    running = await trio.to_thread.run_sync(functools.partial(call, ignore_eos=True))
    assert running.usage is not None and running.usage.completion_tokens == 60
    assert running.choices[0].finish_reason == "length"


async def test_sync_client_streams_with_usage(smollm2_server: RunningServer) -> None:
    def call() -> list[openai.types.chat.ChatCompletionChunk]:
        with sync_client(smollm2_server) as client:
            stream = client.chat.completions.create(
                model="smollm2-135m",
                messages=HI,
                max_completion_tokens=20,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            return list(stream)

    chunks = await trio.to_thread.run_sync(call)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    content_chunks = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert 0 < content_chunks <= chunks[-1].usage.completion_tokens <= 20
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])


async def test_async_client_chat_and_stream_on_tiny_gpt_oss(tiny_server: RunningServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    async with client:
        completion = await client.chat.completions.create(
            model="tiny-gpt-oss",
            messages=HI,
            max_tokens=12,
            temperature=0,
            reasoning_effort="low",
        )
        message = completion.choices[0].message
        extra = message.model_extra or {}
        assert "reasoning" in extra and "reasoning_content" in extra
        assert completion.usage is not None and completion.usage.completion_tokens == 12
        stream = await client.chat.completions.create(
            model="tiny-gpt-oss",
            messages=HI,
            max_tokens=12,
            temperature=0,
            reasoning_effort="low",
            stream=True,
        )
        streamed = ""
        async for chunk in stream:
            if chunk.choices:
                streamed += chunk.choices[0].delta.content or ""
    # The random-weight model writes no Harmony message: its raw text is shown as the answer.
    assert message.content and streamed == message.content


async def test_completions_and_models(tiny_server: RunningServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    async with client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny-gpt-oss"]
        completion = await client.completions.create(
            model="tiny-gpt-oss", prompt="Once upon", max_tokens=5, temperature=0
        )
        assert completion.object == "text_completion" and completion.choices[0].text
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        default_length = await client.completions.create(model="tiny-gpt-oss", prompt="Once upon", temperature=0)
        assert default_length.usage is not None and default_length.usage.completion_tokens == 16
        chunks = [
            c
            async for c in await client.completions.create(
                model="tiny-gpt-oss", prompt="Once upon", max_tokens=5, temperature=0, stream=True
            )
        ]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text


async def test_errors_come_in_openais_shape(tiny_server: RunningServer) -> None:
    client = openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    async with client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=3)
        assert "gpt-4o" in str(missing.value)
        with pytest.raises(openai.BadRequestError) as too_many:
            await client.chat.completions.create(model="tiny-gpt-oss", messages=HI, max_tokens=3, n=17)
        assert too_many.value.param == "n"
        with pytest.raises(openai.BadRequestError) as too_long:
            await client.chat.completions.create(model="tiny-gpt-oss", messages=HI, max_tokens=9000)
        assert "context" in str(too_long.value)
    # Errors are JSON as the answers are: non-ASCII as UTF-8, not as \u escapes.
    async with httpx.AsyncClient(base_url=tiny_server.url, timeout=60) as raw:
        unknown = await raw.get("/v1/models/modèle-é")
    assert unknown.status_code == 404 and "modèle-é".encode() in unknown.content, unknown.content


async def test_raw_stream_ends_with_done_and_continuous_usage(tiny_server: RunningServer) -> None:
    body = {
        "messages": HI,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "an_unknown_field": True,
    }
    async with httpx.AsyncClient(base_url=tiny_server.url, timeout=30) as client:
        lines = []
        async with aconnect_sse(client, "POST", "/v1/chat/completions", json=body) as source:
            assert source.response.headers["X-Cache"] in ("MISS", "HIT")
            async for sse in source.aiter_sse():
                lines.append(sse.data)
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" in c for c in chunks)
    assert chunks[0]["prompt_version"] == "pb-1" and len(chunks[0]["cache_key"]) == 64
    assert chunks[-1]["usage"]["completion_tokens"] == 4

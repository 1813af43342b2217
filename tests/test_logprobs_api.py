"""Logprobs through a live server on SmolLM2, read with the official openai client (sync and async)
and plain HTTP: chat, legacy completions, /generate, the 400s, and a prompt-cache replay."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from openai.types.chat import ChatCompletionMessageParam

from app.engine.loader import ModelWeights
from tests.conftest import RunningServer, server_config, server_in_thread

MODEL = "smollm2-135m"
# SmolLM2 answers this in Japanese, whose characters byte-level BPE splits across tokens.
SPLIT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "How do you say thank you in Japanese?"}]
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hi."}]
NO_CACHE = {"cache": False}  # a generation of its own, not a replay of an earlier one


@pytest.fixture(scope="module")
def url(smollm2_weights: ModelWeights) -> Iterator[str]:
    with server_in_thread(smollm2_weights, server_config(model=MODEL)) as served:
        yield served


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def joined(entries: Sequence[Any]) -> bytes:
    return b"".join(bytes(entry.bytes or ()) for entry in entries)


def check_chat_entries(entries: list[Any], content: str, k: int) -> None:
    """The entries spell the content byte for byte; each lists k alternatives, likeliest first,
    and the chosen token is among them or below the least of them."""
    assert joined(entries).decode("utf-8") == content
    for entry in entries:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == k and values == sorted(values, reverse=True)
        assert all(t.bytes for t in entry.top_logprobs)
        same = [t.logprob for t in entry.top_logprobs if t.token == entry.token]
        if same:
            assert entry.logprob == pytest.approx(same[0])
        else:
            assert entry.logprob <= values[-1] + 1e-6
        assert entry.logprob <= 0.0


def test_chat_logprobs_with_the_sync_client(url: str) -> None:
    with client(url) as openai_client:
        completion = openai_client.chat.completions.create(
            model=MODEL, messages=SPLIT, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3
        )
        plain = openai_client.chat.completions.create(model=MODEL, messages=SPLIT, max_tokens=16, temperature=0)
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    content = choice.message.content or ""
    check_chat_entries(entries, content, 3)
    assert any(e.token.startswith("bytes:\\x") for e in entries), "a split character is spelled as its bytes"
    assert completion.usage is not None
    stop = 1 if choice.finish_reason == "stop" else 0  # the end token is counted, not shown
    assert len(entries) == completion.usage.completion_tokens - stop
    assert all(e.token == e.top_logprobs[0].token for e in entries), "greedy: the chosen is the likeliest"
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == content


async def test_streamed_chat_logprobs_with_the_async_client(url: str) -> None:
    """Each chunk carries the entries of the tokens it shows; together they are the non-streamed ones."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as aclient:
        whole = await aclient.chat.completions.create(
            model=MODEL, messages=SPLIT, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3
        )
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=SPLIT,
            max_tokens=16,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            stream=True,
            extra_body=NO_CACHE,
        )
        chunks = [chunk async for chunk in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert content == whole.choices[0].message.content
    check_chat_entries(entries, content, 3)
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content is not None
    expected = whole.choices[0].logprobs.content
    assert [e.token for e in entries] == [e.token for e in expected]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in expected], abs=1e-5)
    # A chunk shows a character once it is whole, and carries the entries of every token in it.
    for chunk in (c for c in chunks if c.choices and c.choices[0].delta.content):
        logprobs = chunk.choices[0].logprobs
        assert logprobs is not None and logprobs.content
        assert joined(logprobs.content).decode() == chunk.choices[0].delta.content
    assert any(c.choices[0].logprobs and len(c.choices[0].logprobs.content or []) > 1 for c in chunks if c.choices), (
        "some chunk shows a character split over tokens, or this test proves little"
    )


def test_completions_logprobs_in_the_legacy_shape(url: str) -> None:
    prompt = "The capital of France is"
    with client(url) as openai_client:
        completion = openai_client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2
        )
        stream = openai_client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2, stream=True, extra_body=NO_CACHE
        )
        chunks = list(stream)
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert logprobs.text_offset is not None
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == 8
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(8)]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert token in top and top[token] == pytest.approx(value), "the chosen token is always in it"
        assert 2 <= len(top) <= 3 and value == max(top.values())  # greedy
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].logprobs:
            for name, values in streamed.items():
                values.extend(getattr(chunk.choices[0].logprobs, name))
    assert streamed["tokens"] == logprobs.tokens and streamed["text_offset"] == logprobs.text_offset
    assert streamed["token_logprobs"] == pytest.approx(logprobs.token_logprobs, abs=1e-5)


def test_generate_token_events_carry_logprobs(url: str) -> None:
    body = {"messages": HI, "max_tokens": 40, "temperature": 0, "logprobs": 4, "cache": False}
    with httpx.Client(base_url=url, timeout=60) as http:
        with connect_sse(http, "POST", "/generate", json=body) as source:
            events = [(sse.event, json.loads(sse.data)) for sse in source.iter_sse()]
        whole = http.post("/generate", json={**body, "stream": False}).json()
        bare = http.post("/generate", json={**body, "logprobs": None, "stream": False}).json()
    tokens = [data for name, data in events if name == "token"]
    done = next(data for name, data in events if name == "done")
    assert done["finish_reason"] == "stop", "the end token is a token event too"
    assert len(tokens) == done["usage"]["completion_tokens"]
    for token in tokens:
        values = [t["logprob"] for t in token["top_logprobs"]]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert token["logprob"] == pytest.approx(values[0]) and token["top_logprobs"][0]["bytes"] == token["bytes"]
    assert bytes(tokens[-1]["bytes"]) == b"<|im_end|>" and tokens[-1]["text"] == ""
    assert [e["token_id"] for e in whole["logprobs"]] == [t["token_id"] for t in tokens]
    assert [e["logprob"] for e in whole["logprobs"]] == pytest.approx([t["logprob"] for t in tokens], abs=1e-5)
    assert "logprobs" not in bare


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": "yes please"}, "logprobs"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"logprobs": 2.5}, "logprobs"),
        ("/generate", {"logprobs": 25}, "logprobs"),
    ],
)
def test_out_of_range_logprobs_are_400s_in_openais_shape(
    url: str, path: str, fields: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"max_tokens": 2, **fields}
    body |= {"prompt": "Hi"} if path == "/v1/completions" else {"messages": HI}
    with httpx.Client(base_url=url, timeout=60) as http:
        response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]
    assert isinstance(error["code"], str)


def test_the_openai_client_gets_bad_request_for_top_logprobs_alone(url: str) -> None:
    with client(url) as openai_client, pytest.raises(openai.BadRequestError) as refused:
        openai_client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, top_logprobs=2)
    assert "logprobs" in str(refused.value)


def test_explicit_nulls_are_the_defaults(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        chat = http.post(
            "/v1/chat/completions",
            json={"messages": HI, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": None},
        )
        legacy_body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0, "logprobs": None}
        legacy = http.post("/v1/completions", json=legacy_body)
    assert chat.status_code == 200 and legacy.status_code == 200
    entries = chat.json()["choices"][0]["logprobs"]["content"]
    assert len(entries) == 3 and all(e["top_logprobs"] == [] for e in entries)
    assert legacy.json()["choices"][0]["logprobs"] is None


def test_a_cache_replay_gives_the_same_logprobs(url: str) -> None:
    body = {"messages": HI, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    with httpx.Client(base_url=url, timeout=60) as http:
        without = http.post("/v1/chat/completions", json={**body, "logprobs": None, "top_logprobs": None})
        first = http.post("/v1/chat/completions", json=body)
        again = http.post("/v1/chat/completions", json=body)
        with connect_sse(http, "POST", "/v1/chat/completions", json={**body, "stream": True}) as source:
            replay_status = source.response.headers["X-Cache"]
            streamed_again = [json.loads(sse.data) for sse in source.iter_sse() if sse.data != "[DONE]"]
    assert without.headers["X-Cache"] in ("MISS", "HIT") and first.headers["X-Cache"] == "MISS"
    assert without.headers["X-Cache-Key"] != first.headers["X-Cache-Key"], "logprobs are part of the answer's key"
    assert again.headers["X-Cache"] == "HIT" and replay_status == "HIT"
    original = first.json()["choices"][0]["logprobs"]
    assert original["content"] and again.json()["choices"][0]["logprobs"] == original
    choices = [choice for chunk in streamed_again for choice in chunk["choices"] if choice.get("logprobs")]
    replayed = [entry for choice in choices for entry in choice["logprobs"]["content"]]
    assert replayed == original["content"]


async def test_gpt_oss_lists_reasoning_apart_and_text_that_is_not_harmony_in_content(
    tiny_server: RunningServer,
) -> None:
    """The random-weight tiny gpt-oss writes no Harmony message: its held headers turn out to be
    text, and every one of its tokens gets its entry in ``content`` (``reasoning`` is there, empty)."""
    async with openai.AsyncOpenAI(
        base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=60
    ) as aclient:
        completion = await aclient.chat.completions.create(
            model="tiny-gpt-oss", messages=HI, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
        )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert (choice.logprobs.model_extra or {}).get("reasoning") == []
    check_chat_entries(choice.logprobs.content, choice.message.content or "", 2)
    assert completion.usage is not None and len(choice.logprobs.content) == completion.usage.completion_tokens == 12

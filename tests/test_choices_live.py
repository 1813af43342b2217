"""``n`` choices and lists of prompts through the official openai client, on SmolLM2 (one server).

Breakage each test names; each failed before the feature (n other than 1 was refused, and
/v1/completions took a single string).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from typing import Any, cast

import httpx
import openai
import pytest
import trio
from openai.types.chat import ChatCompletionMessageParam

from app.engine.loader import ModelWeights
from tests.conftest import server_config, server_in_thread, wait_for_stats

MODEL = "smollm2-135m"
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write a short poem about the sea."}]
A, B = "The capital of France is", "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def live(smollm2_weights: ModelWeights) -> Iterator[str]:
    """One SmolLM2 server for the module (its own trio loop, in a thread)."""
    with server_in_thread(smollm2_weights, server_config(model=MODEL)) as url:
        yield url


def sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def async_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def figures(url: str) -> dict[str, Any]:
    (model_figures,) = httpx.get(f"{url}/stats", timeout=30).json()["model_metrics"].values()
    return dict(model_figures)


def chat(url: str, **options: Any) -> openai.types.chat.ChatCompletion:
    with sync_client(url) as client:
        return client.chat.completions.create(model=MODEL, messages=ASK, **options)


def test_seeded_n3_chat_gives_three_distinct_choices_that_are_seed_plus_j_and_the_same_again(live: str) -> None:
    """Breakage caught: one seed for every choice (equal choices), a seed per choice that is not
    seed + j (choice j differs from an n=1 request with that seed), a child whose copied keys or
    own last-token prefill are off (it differs from the unforked n=1 run), a prompt prefilled once
    per choice, usage counting the prompt n times."""
    options: dict[str, Any] = {"max_tokens": 24, "temperature": 0.9, "seed": 42}
    before = figures(live)["tokens"]["prefilled"]
    first = chat(live, n=3, extra_body={"cache": False}, **options)
    prefilled = figures(live)["tokens"]["prefilled"] - before
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) == 3, texts
    again = chat(live, n=3, **options)  # through the prompt cache this time
    assert [c.message.content for c in again.choices] == texts
    singles = [chat(live, **{**options, "seed": 42 + j}, extra_body={"cache": False}) for j in range(3)]
    assert [s.choices[0].message.content for s in singles] == texts
    assert first.usage is not None and singles[0].usage is not None
    prompt_tokens = singles[0].usage.prompt_tokens
    assert first.usage.prompt_tokens == prompt_tokens, "the prompt is counted once"
    assert first.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles if s.usage)
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert prefilled == prompt_tokens + 2, "one prefill of the prompt, one token for each other choice"


def test_greedy_n2_gives_equal_choices_with_and_without_the_cache(live: str) -> None:
    """Breakage caught: a forked greedy child that differs from its parent (as OpenAI, greedy
    choices are one answer), or one that never starts when the cache serves it."""
    single = chat(live, max_tokens=16, temperature=0)
    expected = single.choices[0].message.content
    for extra in ({}, {"cache": False}):
        both = chat(live, n=2, max_tokens=16, temperature=0, extra_body=extra)
        assert [(c.index, c.message.content) for c in both.choices] == [(0, expected), (1, expected)]


async def test_a_streamed_n2_interleaves_its_choices_and_ends_each_once(live: str) -> None:
    """Breakage caught: choices streamed one after the other (the second waits for the first),
    chunks without their choice's index, one finish chunk for the request rather than per choice,
    [DONE] or the usage chunk before every choice has finished, usage of one choice only."""
    options: dict[str, Any] = {"max_tokens": 16, "temperature": 0.9, "seed": 7, "extra_body": {"ignore_eos": True}}
    async with async_client(live) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, n=2, stream=True, stream_options={"include_usage": True}, **options
        )
        chunks = [chunk async for chunk in stream]
        whole = await client.chat.completions.create(model=MODEL, messages=ASK, n=2, **options)
    with_choices = [c for c in chunks if c.choices]
    assert sorted({c.choices[0].delta.role for c in with_choices if c.choices[0].delta.role}) == ["assistant"]
    assert [c.choices[0].index for c in with_choices if c.choices[0].delta.role] == [0, 1]
    content = [c.choices[0].index for c in with_choices if c.choices[0].delta.content]
    assert content != sorted(content), f"the choices were not interleaved: {content}"
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in with_choices if c.choices[0].finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    last_finish = max(i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason)
    assert chunks[-1].choices == [] and last_finish == len(chunks) - 2, "usage comes last, once"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 2 * 16
    assert whole.usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens
    streamed = [
        "".join(c.choices[0].delta.content or "" for c in with_choices if c.choices[0].index == i) for i in (0, 1)
    ]
    assert streamed == [c.message.content for c in whole.choices]


def completions(url: str, **options: Any) -> openai.types.Completion:
    with sync_client(url) as client:
        return client.completions.create(model=MODEL, max_tokens=8, temperature=0, **options)


def test_a_list_of_two_prompts_with_n2_gives_four_choices_in_openais_order(live: str) -> None:
    """Breakage caught: choices numbered choice-major (index = j * prompts + p), a prompt's
    choices answered from the other prompt, the prompt tokens counted per choice."""
    alone = {text: completions(live, prompt=text) for text in (A, B)}
    both = completions(live, prompt=[A, B], n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    expected = [alone[A].choices[0].text] * 2 + [alone[B].choices[0].text] * 2
    assert [c.text for c in both.choices] == expected
    assert alone[A].choices[0].text != alone[B].choices[0].text
    usage, usage_a, usage_b = both.usage, alone[A].usage, alone[B].usage
    assert usage is not None and usage_a is not None and usage_b is not None
    assert usage.prompt_tokens == usage_a.prompt_tokens + usage_b.prompt_tokens
    assert usage.completion_tokens == 2 * (usage_a.completion_tokens + usage_b.completion_tokens)


async def test_token_id_prompts_answer_as_the_same_text_does(live: str, smollm2_weights: ModelWeights) -> None:
    """Breakage caught: token ids tokenized as text, or refused; a list of lists read as one prompt."""
    ids_a, ids_b = (list(smollm2_weights.tokenizer.encode(text)) for text in (A, B))
    async with async_client(live) as client:
        by_text = await client.completions.create(model=MODEL, prompt=[A, B], max_tokens=8, temperature=0)
        one = await client.completions.create(model=MODEL, prompt=ids_a, max_tokens=8, temperature=0)
        two = await client.completions.create(model=MODEL, prompt=[ids_a, ids_b], max_tokens=8, temperature=0)
    assert one.choices[0].text == by_text.choices[0].text
    assert [c.text for c in two.choices] == [c.text for c in by_text.choices]
    assert one.usage is not None and one.usage.prompt_tokens == len(ids_a)
    assert (
        two.usage is not None and by_text.usage is not None and two.usage.prompt_tokens == by_text.usage.prompt_tokens
    )


BAD = [
    ("/v1/chat/completions", {"messages": ASK, "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": ASK, "n": 17}, "n"),
    ("/v1/completions", {"prompt": "x", "n": -1}, "n"),
    ("/v1/completions", {"prompt": ["x"] * 5, "n": 16}, "n"),  # 80 choices
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": [-1, 2]}, "prompt"),
    ("/v1/completions", {"prompt": [49152]}, "prompt"),  # SmolLM2's vocabulary is 0..49151
    ("/v1/completions", {"prompt": [[5], [10**9]]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", 1]}, "prompt"),
    ("/v1/completions", {"prompt": [True, 1]}, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 17}, "prompt"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD, ids=[json.dumps(b)[:40] for _, b, _ in BAD])
def test_values_out_of_range_are_400s_in_openais_shape(live: str, path: str, body: dict[str, Any], param: str) -> None:
    """Breakage caught: pydantic's 422, a 500 from a token id past the embedding, a code that is
    a number (clients match on it)."""
    response = httpx.post(f"{live}{path}", json={**body, "max_tokens": 2}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["code"] is None or isinstance(error["code"], str)


def test_the_client_raises_bad_request_for_n_out_of_range(live: str) -> None:
    with sync_client(live) as client, pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, n=17)
    assert refused.value.param == "n"


async def test_a_client_that_leaves_an_n3_stream_frees_all_three_rows(live: str) -> None:
    """Breakage caught: only choice 0's abort registered with the request (the others generate
    on for nobody), or pumps that outlive the response."""
    body = {
        "model": MODEL,
        "messages": ASK,
        "n": 3,
        "max_tokens": 3000,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=live, timeout=60) as client:
        start = (await client.get("/stats")).json()
        seen: set[int] = set()
        received = b""
        # aiter_raw is one generator; httpx's text iterators nest several that aclosing cannot reach.
        async with (
            client.stream("POST", "/v1/chat/completions", json=body) as response,
            aclosing(cast(AsyncGenerator[bytes, None], response.aiter_raw())) as chunks,
        ):
            async for chunk in chunks:
                *events, received = (received + chunk).split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: {"):
                        seen.update(choice["index"] for choice in json.loads(event[6:])["choices"])
                if seen == {0, 1, 2}:
                    break
        cancelled = start["cancelled_requests"] + 3
        (start_figures,) = start["model_metrics"].values()
        torn_down = start_figures["cancel_teardown_steps"]["count"] + 3

        def all_freed(stats: dict[str, Any]) -> bool:
            # A teardown is counted once its row is freed, after the step that was in flight.
            (now,) = stats["model_metrics"].values()
            return bool(
                stats["active_sequences"] == 0
                and stats["cancelled_requests"] == cancelled
                and now["cancel_teardown_steps"]["count"] == torn_down
            )

        stats = await wait_for_stats(client, all_freed, timeout=30)
        (model_figures,) = stats["model_metrics"].values()
        generated = model_figures["tokens"]["completion"]
        await trio.sleep(0.5)
        later = (await client.get("/stats")).json()
    (later_figures,) = later["model_metrics"].values()
    assert later_figures["tokens"]["completion"] == generated, "nothing generates for a client that is gone"
    assert later_figures["active_streams"] == 0 and later_figures["active_generations"] == 0
    assert later["cancelled_requests"] == cancelled

"""Tenants that cannot starve or evict each other, and the defaults a request gets (issue 24).

One tiny gpt-oss server behind two API keys for the module: a small response-store share per
key, three streams per key, a default max_tokens, and a --generation-config folder whose
generation_config.json makes the default sampling greedy. Each test names the breakage it
catches; each failed before the change it tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import trio

from actors.messages import GenerationJob
from actors.stream_counts import StreamCounts, TooManyStreams
from app.contract.sampling import SamplingParams
from app.engine.loader import ModelWeights
from app.http.choice_jobs import choice_job
from app.prompts.cache_key import cache_key
from tests.conftest import server_config, server_in_thread

ALICE, BOB = "alice-key-0001", "bob-key-000002"
SHARE_BYTES = 16 * 1024
DEFAULT_TOKENS = 6
MODEL = "tiny-gpt-oss"


@pytest.fixture(scope="module")
def live(tiny_weights: ModelWeights, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("generation")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_p": 0.5}))
    config = server_config(
        api_keys=(ALICE, BOB),
        responses_max_bytes=SHARE_BYTES,
        responses_max_count=8,
        max_streams_per_key=3,
        max_tokens_default=DEFAULT_TOKENS,
        generation_config=str(folder),
    )
    with server_in_thread(tiny_weights, config) as url:
        yield url


def client(url: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def assert_openai_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert error["param"] == param and isinstance(error["message"], str), error


async def test_a_flood_from_one_key_cannot_evict_anothers_stored_response(live: str) -> None:
    """Breakage caught: the store's bounds were global (bob's writes pushed alice's out: 404)."""
    async with client(live, ALICE) as alice, client(live, BOB) as bob:
        with trio.fail_after(60):
            mine = await alice.post("/v1/responses", json={"input": "keep me", "max_output_tokens": 1})
            assert mine.status_code == 200, mine.text
            thought = {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "z" * 5000}]}
            flood = {"input": [thought, {"role": "user", "content": "again"}], "max_output_tokens": 1}
            ids = []
            for _ in range(12):  # some 60 KB: past bob's share several times over
                answer = await bob.post("/v1/responses", json=flood)
                assert answer.status_code == 200, answer.text
                ids.append(answer.json()["id"])
            kept = await alice.get(f"/v1/responses/{mine.json()['id']}")
            first, last = [await bob.get(f"/v1/responses/{rid}") for rid in (ids[0], ids[-1])]
    assert kept.status_code == 200 and kept.json()["id"] == mine.json()["id"]
    assert first.status_code == 404 and last.status_code == 200, "bob's share evicts bob's oldest"


async def test_every_input_item_is_checked_against_the_context_and_the_share(live: str) -> None:
    """Breakage caught: a reasoning item (which the prompt leaves out) stored unchecked whatever
    its size; a conversation over the store's share accepted, then never kept."""
    long_thought = {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "ab " * 9000}]}
    over_context = {"input": [long_thought, {"role": "user", "content": "hi"}], "max_output_tokens": 1}
    big = {"input": [{"role": "user", "content": "lorem " * 3000}], "max_output_tokens": 1}
    async with client(live, ALICE) as alice:
        with trio.fail_after(60):
            refused = await alice.post("/v1/responses", json=over_context)
            over_share = await alice.post("/v1/responses", json=big)
            unstored = await alice.post("/v1/responses", json={**big, "store": False})
    assert_openai_error(refused, 400, "context_length_exceeded", "input[0]")
    assert "maximum context length is 8192 tokens" in refused.json()["error"]["message"]
    assert_openai_error(over_share, 400, "invalid_value", "input")
    assert str(SHARE_BYTES) in over_share.json()["error"]["message"]
    assert unstored.status_code == 200, "without store the share does not apply"


async def open_unread_stream(stack: AsyncExitStack, api: httpx.AsyncClient) -> httpx.Response:
    """A stream whose headers arrived (it holds its slot) and that is never read."""
    body = {"prompt": "never read", "max_tokens": 4000, "stream": True, "cache": False}
    response = await stack.enter_async_context(api.stream("POST", "/generate", json=body))
    assert response.status_code == 200
    return response


async def active_streams(api: httpx.AsyncClient) -> int:
    return int((await api.get("/stats")).json()["model_metrics"][MODEL]["active_streams"])


async def test_a_key_holding_its_unread_streams_does_not_stop_another_keys_request(live: str) -> None:
    """Breakage caught: one bound for everyone (one key's unread streams held every slot, the
    others got 429 until those streams ended)."""
    async with client(live, ALICE) as alice, client(live, BOB) as bob:
        with trio.fail_after(60):
            async with AsyncExitStack() as stack:
                for _ in range(3):
                    await open_unread_stream(stack, await stack.enter_async_context(client(live, ALICE)))
                third = await alice.post("/generate", json={"prompt": "one more", "max_tokens": 1, "stream": False})
                others = await bob.post("/generate", json={"prompt": "mine", "max_tokens": 1, "stream": False})
            while await active_streams(alice):  # the unread ones end with their connections
                await trio.sleep(0.02)
    assert_openai_error(third, 429, "too_many_streams")
    assert int(third.headers["Retry-After"]) >= 1 and "--max-streams-per-key" in third.json()["error"]["message"]
    assert others.status_code == 200, others.text


async def test_a_request_that_sets_no_limit_gets_the_default_one(live: str) -> None:
    """Breakage caught: no limit meant the rest of the context (8,186 tokens of a random model)."""
    async with client(live, ALICE) as alice:
        with trio.fail_after(60):
            unset = await alice.post("/generate", json={"prompt": "go on", "temperature": 1.0, "stream": False})
            chat = await alice.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "go"}]})
            own = await alice.post(
                "/generate", json={"prompt": "go on", "max_tokens": 9, "temperature": 1.0, "stream": False}
            )
    assert unset.json()["usage"]["completion_tokens"] == DEFAULT_TOKENS and unset.json()["finish_reason"] == "length"
    assert chat.json()["usage"]["completion_tokens"] == DEFAULT_TOKENS
    assert own.json()["usage"]["completion_tokens"] == 9, "the request's own limit wins"


async def test_default_sampling_comes_from_the_generation_config_and_the_request_wins(live: str) -> None:
    """Breakage caught: a request without temperature always sampled at 1.0 (never greedy, so
    never cached), whatever the model's generation_config.json said."""
    body: dict[str, Any] = {"prompt": "same words", "max_tokens": 3, "stream": False}
    async with client(live, ALICE) as alice:
        with trio.fail_after(60):
            health = (await alice.get("/health")).json()
            default = [(await alice.post("/generate", json=body)).headers["X-Cache"] for _ in range(2)]
            own = [(await alice.post("/generate", json={**body, "temperature": 1.0})).headers["X-Cache"] for _ in "ab"]
            echoed = (await alice.post("/v1/responses", json={"input": "hi", "max_output_tokens": 1})).json()
    shown = health["sampling_defaults"]
    assert shown["temperature"] == 0.0 and shown["top_p"] == 0.5 and shown["max_tokens"] == DEFAULT_TOKENS
    assert shown["source"].endswith("generation_config.json")
    assert default == ["MISS", "HIT"], "greedy by default: deterministic, so the second is replayed"
    assert own == ["BYPASS", "BYPASS"], "temperature 1 without a seed is never replayed"
    assert (echoed["temperature"], echoed["top_p"]) == (0.0, 0.5)


async def cache_hits(api: httpx.AsyncClient) -> int:
    return int((await api.get("/stats")).json()["model_metrics"][MODEL]["cache"]["hits"])


async def test_seeded_choices_of_one_key_are_never_replayed_to_another(live: str) -> None:
    """Breakage caught: choices 1.. of a seeded n > 1 request keyed without the tenant (bob got
    alice's choices 1 and 2 from the cache)."""
    body = {"prompt": "pick three", "max_tokens": 3, "temperature": 1.0, "seed": 7, "n": 3}
    async with client(live, ALICE) as alice, client(live, BOB) as bob:
        with trio.fail_after(60):
            await alice.post("/v1/completions", json=body)
            before = await cache_hits(alice)
            bobs = await bob.post("/v1/completions", json=body)
            after_bob = await cache_hits(alice)
            again = await alice.post("/v1/completions", json=body)
            after_alice = await cache_hits(alice)
    assert bobs.status_code == 200 and len(bobs.json()["choices"]) == 3
    assert after_bob == before, "none of bob's choices came from alice's answers"
    assert after_alice == before + 3, "alice's own choices all replay"
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in bobs.json()["choices"]]


def test_the_unkeyed_are_one_tenant_and_a_closed_stream_frees_its_tenants_slot() -> None:
    counts = StreamCounts(max_streams=4, max_per_tenant=2)
    counts.open(None)
    counts.open(None)
    with pytest.raises(TooManyStreams, match="--max-streams-per-key"):
        counts.open(None)  # every unkeyed caller together is one tenant
    counts.open("bob")
    counts.close(None)
    counts.open(None)
    counts.open("bob")
    with pytest.raises(TooManyStreams, match=r"\(--max-streams\)"):
        counts.open("carol")  # the server's own bound still holds
    assert counts.total == 4


def test_every_choice_key_carries_the_tenant_and_single_call() -> None:
    """Breakage caught: choice_job keyed choices 1.. without the tenant (or single_call), so a
    seeded n > 1 request's later choices replayed across tenants."""
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=7)

    def keys(tenant: str | None, single_call: bool = False) -> list[str]:
        key = cache_key("v", MODEL, (1, 2), params, "plain", tenant, single_call=single_call)
        job = GenerationJob((1, 2), params, 0.0, cache_key=key, tenant=tenant, single_call=single_call)
        return [choice_job(job, j, MODEL).cache_key for j in range(3)]

    alice, bob, alone = keys("alice"), keys("bob"), keys("alice", single_call=True)
    assert len(set(alice)) == 3 and not set(alice) & set(bob) and not set(alice) & set(alone)

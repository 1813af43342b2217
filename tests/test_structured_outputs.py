"""Structured outputs and OpenAI's error contract, through real clients against a live server.

SmolLM2 (a real instruct model) for the clients: the official `openai` client (sync, async,
`chat.completions.parse` with a pydantic model), LangChain's `with_structured_output` and
LiteLLM's error classes. The tiny gpt-oss for Harmony: its random weights never end an analysis,
so a hook scripts the analysis tokens, and the real grammar engine constrains the final answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema
from pydantic import BaseModel

from app.engine.loader import ModelWeights
from app.prompts.builder import ChatMessage, PromptSpec, build_prompt_tokens
from tests.conftest import RunningServer, running_server, server_config, server_in_thread, wait_for_stats
from tests.scripted_harmony import THEN_FINAL, scripted_server

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM must not fetch it from the web

MODEL = "smollm2-135m"
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Is the sky blue? Answer in JSON."}]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"color": {"enum": ["blue", "red", "green"]}, "sure": {"type": "boolean"}},
    "required": ["color", "sure"],
    "additionalProperties": False,
}
SCHEMA_FORMAT: ResponseFormatJSONSchema = {
    "type": "json_schema",
    "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True},
}


class Verdict(BaseModel):
    color: Literal["blue", "red", "green"]
    sure: bool


@pytest.fixture(scope="module")
def live(smollm2_weights: ModelWeights) -> Iterator[str]:
    with server_in_thread(smollm2_weights, server_config(model=MODEL)) as url:
        yield url


def sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120) as http:
        return http.post(path, json=body)


def test_the_openai_client_parses_into_a_pydantic_model(live: str) -> None:
    with sync_client(live) as client:
        completion = client.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Verdict, temperature=0, max_tokens=60
        )
    choice = completion.choices[0]
    assert isinstance(choice.message.parsed, Verdict)
    assert choice.finish_reason == "stop"  # it ended by itself, within max_tokens


async def test_a_streamed_schema_answer_validates_and_is_served_from_the_cache_again(live: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0, timeout=120)
    async with client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=SCHEMA_FORMAT, temperature=0, max_tokens=60, stream=True
        )
        parts, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
    jsonschema.validate(json.loads("".join(parts)), SCHEMA)
    assert finish == "stop"
    body = {"model": MODEL, "messages": ASK, "response_format": SCHEMA_FORMAT, "temperature": 0, "max_tokens": 60}
    first, again = post(live, "/v1/chat/completions", body), post(live, "/v1/chat/completions", body)
    assert again.headers["X-Cache"] == "HIT"
    assert again.json()["choices"][0]["message"]["content"] == "".join(parts)
    assert (
        first.json()["cache_key"]
        != post(live, "/v1/chat/completions", {**body, "response_format": None}).json()["cache_key"]
    )


def test_vllm_choice_and_regex_on_chat_completions_and_generate(live: str) -> None:
    with sync_client(live) as client:
        chosen = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Pick a fruit."}],
            temperature=0.8,
            seed=3,
            max_tokens=20,
            extra_body={"structured_outputs": {"choice": ["apple pie", "banana"]}},
        )
        assert chosen.choices[0].message.content in ("apple pie", "banana")
        text = client.completions.create(
            model=MODEL,
            prompt="My phone number is",
            max_tokens=30,
            temperature=0,
            extra_body={"guided_regex": r" [0-9]{3}-[0-9]{4}"},
        )
    assert text.choices[0].finish_reason == "stop"
    assert __import__("re").fullmatch(r" [0-9]{3}-[0-9]{4}", text.choices[0].text)
    generated = post(
        live,
        "/generate",
        {
            "prompt": "A list:",
            "max_tokens": 30,
            "temperature": 0,
            "stream": False,
            "response_format": {"type": "json_object"},
        },
    ).json()
    assert isinstance(json.loads(generated["text"]), dict | list)


def test_langchain_with_structured_output(live: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{live}/v1", api_key="unused", temperature=0, max_retries=0)  # type: ignore[arg-type]
    answer = llm.with_structured_output(Verdict).invoke("Is the sky blue? Answer in JSON.")
    assert isinstance(answer, Verdict)


def test_litellm_classifies_our_errors(live: str) -> None:
    import litellm

    common: dict[str, Any] = {"model": f"openai/{MODEL}", "api_base": f"{live}/v1", "api_key": "unused"}
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(messages=ASK, max_tokens=10**6, **common)
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    with pytest.raises(litellm.BadRequestError) as caught:
        litellm.completion(messages=ASK, response_format=bad_schema, **common)
    assert not isinstance(caught.value, litellm.ContextWindowExceededError)
    assert 'Unsupported type \\"objectx\\"' in str(caught.value) or 'Unsupported type "objectx"' in str(caught.value)
    answer = litellm.completion(messages=ASK, response_format=SCHEMA_FORMAT, temperature=0, max_tokens=60, **common)
    jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}},
            "response_format",
            "invalid_response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "invalid_value"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
        ({"structured_outputs": {"regex": "(open"}}, "structured_outputs", "invalid_response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "invalid_value"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "invalid_value"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, None, "invalid_value"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens", "invalid_value"),
        ({"guided_json": "{not json"}, "guided_json", "invalid_response_format"),
        ({"logit_bias": {"49152": 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"12": 101}}, "logit_bias.12", "invalid_value"),
        ({"logit_bias": {"-1": 1}}, "logit_bias", "invalid_value"),
    ],
)
def test_refused_values_are_400s_in_openais_shape(
    live: str, fields: dict[str, Any], param: str | None, code: str
) -> None:
    response = post(live, "/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 4, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    assert isinstance(error["message"], str) and "Traceback" not in error["message"]


def test_the_openai_client_gets_a_bad_request_error_with_a_string_code(live: str) -> None:
    with sync_client(live) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    ],
                }
            ],
        )
    assert caught.value.status_code == 400
    assert "this model accepts text only" in caught.value.message
    assert caught.value.code == "invalid_value"


def test_explicit_nulls_mean_the_defaults(live: str) -> None:
    body = {
        "model": MODEL,
        "messages": ASK,
        "max_tokens": 3,
        "stream": None,
        "n": None,
        "stop": None,
        "min_tokens": None,
        "ignore_eos": None,
        "response_format": None,
        "logit_bias": None,
        "stream_options": None,
        "temperature": None,
    }
    response = post(live, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"  # stream: null is not streaming


def test_logit_bias_forces_and_forbids_tokens(live: str, smollm2_weights: ModelWeights) -> None:
    cat = smollm2_weights.tokenizer.encode(" cat")[0]
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, "temperature": 0}
    forced = post(live, "/v1/chat/completions", {**body, "logit_bias": {str(cat): 100}}).json()
    assert forced["choices"][0]["message"]["content"] == " cat" * 4
    plain = post(live, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    first = smollm2_weights.tokenizer.encode(plain)[0]
    banned = post(live, "/v1/chat/completions", {**body, "logit_bias": {str(first): -100}}).json()
    assert smollm2_weights.tokenizer.encode(banned["choices"][0]["message"]["content"])[0] != first


async def test_a_constrained_stream_that_is_dropped_frees_its_row(smollm2_weights: ModelWeights) -> None:
    long_schema = {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 200}},
        "required": ["items"],
    }
    body = {
        "messages": [{"role": "user", "content": "List many fruits."}],
        "max_tokens": 2000,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "list", "schema": long_schema}},
    }
    from tests.conftest import stream_then_drop

    async with running_server(smollm2_weights, server_config(model=MODEL)) as server, server.client() as client:
        read = await stream_then_drop(client, body, 3)
        assert read >= 3
        stats = await wait_for_stats(
            client, lambda s: s["cancelled_requests"] == 1 and s["active_sequences"] == 0, server=server
        )
        assert stats["cancelled_requests"] == 1
        assert server.server.pipeline.model is not None
        assert server.server.pipeline.model.runner.sequence_ids() == []  # type: ignore[attr-defined]


# -- Harmony: the analysis runs free, the final answer follows the schema -------------------------
@pytest.fixture
async def harmony_server(tiny_weights: ModelWeights) -> AsyncIterator[RunningServer]:
    async with scripted_server(tiny_weights, THEN_FINAL) as server:
        yield server


async def test_harmony_reasons_freely_then_answers_in_the_schema(harmony_server: RunningServer) -> None:
    body = {"messages": ASK, "temperature": 0, "max_tokens": 120, "response_format": SCHEMA_FORMAT}
    async with harmony_server.client() as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["reasoning"] == "Thinking about colors."
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert choice["finish_reason"] == "stop"  # <|return|>, chosen under the grammar after the JSON


def test_harmony_states_the_schema_in_its_developer_message() -> None:
    from app.prompts.harmony_encoding import harmony_encoding

    source = json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))
    spec = PromptSpec(messages=(ChatMessage("user", "Hi"),), response_format=("verdict", "A color.", source))
    text = harmony_encoding().decode(list(build_prompt_tokens(spec, None, True)))
    developer = "<|start|>developer<|message|># Instructions\n\n"
    assert f"{developer}# Response Formats\n\n## verdict\n\n// A color.\n{source}<|end|>" in text


def test_n_choices_each_follow_the_schema_with_their_own_logprobs(live: str) -> None:
    """Everything at once: n=2 sampled choices (the second forked from the first's prefill), each
    under the schema, each with its own logprobs, streamed and not."""
    body = {
        "model": MODEL,
        "messages": ASK,
        "response_format": SCHEMA_FORMAT,
        "temperature": 1.0,
        "seed": 11,
        "n": 2,
        "max_tokens": 60,
        "logprobs": True,
        "top_logprobs": 1,
    }
    whole = post(live, "/v1/chat/completions", body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    for choice in whole["choices"]:
        content = choice["message"]["content"]
        jsonschema.validate(json.loads(content), SCHEMA)
        assert b"".join(bytes(e["bytes"]) for e in choice["logprobs"]["content"]).decode() == content
    with sync_client(live) as client:
        stream = client.chat.completions.create(**{**body, "stream": True})  # type: ignore[call-overload]
        texts: dict[int, str] = {0: "", 1: ""}
        entries: dict[int, int] = {0: 0, 1: 0}
        for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                entries[choice.index] += len(choice.logprobs.content or []) if choice.logprobs else 0
    assert texts == {c["index"]: c["message"]["content"] for c in whole["choices"]}
    assert entries == {c["index"]: len(c["logprobs"]["content"]) for c in whole["choices"]}

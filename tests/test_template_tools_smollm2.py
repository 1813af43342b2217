"""tool_choice auto on SmolLM2 (no Harmony) served with a Hermes chat template (--chat-template
tests/data/hermes_tools.jinja): the tools go into the prompt through the template, and calls in
its ``<tool_call>`` syntax come back as OpenAI tool calls.

SmolLM2-135M does not call tools reliably by itself: a forward hook scripts the SmolLM2 tokens
of a Hermes call (tests/scripted_harmony.py's ``scripted``, with this tokenizer's ids), and
everything after the model (the relay, the parser, the shapes, the metrics) is the server's own.
The last tests run the real model unscripted: whatever it writes, the openai client parses it.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from app.contract.model import ServedModel
from app.engine.loader import ModelWeights
from app.prompts.builder import ChatMessage, PromptSpec, ToolCall, ToolSpec, build_prompt_tokens
from tests.conftest import RunningServer, running_server, server_config, server_in_thread
from tests.scripted_harmony import scripted

MODEL = "smollm2-135m"
HERMES = str(Path(__file__).parent / "data" / "hermes_tools.jinja")
CALL_ID = re.compile(r"call_[0-9a-f]{24}")
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


def smollm2_tokens(weights: ModelWeights, text: str) -> list[int]:
    """The text as SmolLM2 would write it, then its end of turn."""
    tokenizer = weights.tokenizer
    return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]


@asynccontextmanager
async def scripted_smollm2(weights: ModelWeights, text: str, **config: Any) -> AsyncIterator[RunningServer]:
    """A SmolLM2 server with the Hermes template whose model writes ``text``, then stops."""
    handles = []

    def hook_in(loaded: ServedModel) -> ServedModel:
        model = loaded.runner.model  # type: ignore[attr-defined]
        hook = scripted(smollm2_tokens(weights, text))
        handles.append(model.get_output_embeddings().register_forward_hook(hook))
        return loaded

    settings = server_config(model=MODEL, chat_template=HERMES, **config)
    async with running_server(weights, settings, runner_hook=hook_in) as server:
        yield server
    for handle in handles:
        handle.remove()


def request(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 120, **extra}


async def sse_chunks(http: httpx.AsyncClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    async with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line.removeprefix("data: ")))
    return chunks


async def test_a_call_after_some_words_is_a_tool_call_with_content(smollm2_weights: ModelWeights) -> None:
    async with scripted_smollm2(smollm2_weights, "Let me check.\n" + CALL) as server, server.client() as http:
        response = await http.post("/v1/chat/completions", json=request())
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "Let me check."
    [call] = message["tool_calls"]
    assert CALL_ID.fullmatch(call["id"]) and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}


async def test_a_streamed_call_is_content_then_tool_call_deltas(smollm2_weights: ModelWeights) -> None:
    async with scripted_smollm2(smollm2_weights, "Let me check.\n" + CALL) as server, server.client() as http:
        chunks = await sse_chunks(http, request())
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Let me check."
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    opening, *fragments = calls
    assert opening["index"] == 0 and CALL_ID.fullmatch(opening["id"]) and opening["type"] == "function"
    assert opening["function"]["name"] == "get_weather"
    # The arguments come as they are decoded (SmolLM2 writes them in several tokens), not at the end.
    assert len(fragments) >= 4 and all("id" not in f and f["index"] == 0 for f in fragments)
    arguments = opening["function"]["arguments"] + "".join(f["function"]["arguments"] for f in fragments)
    assert json.loads(arguments) == {"city": "Paris", "days": 2}
    # No content comes after the call opened: the call's text is not shown as words.
    first_call = next(i for i, d in enumerate(deltas) if d.get("tool_calls"))
    assert not any(d.get("content") for d in deltas[first_call:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_two_calls_through_the_openai_client(smollm2_weights: ModelWeights) -> None:
    second = CALL.replace("Paris", "Oslo")
    async with (
        scripted_smollm2(smollm2_weights, CALL + "\n" + second) as server,
        openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        completion = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather in Paris and Oslo?"}],
            tools=[WEATHER],
            tool_choice="auto",
            temperature=0,
            max_tokens=120,
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    cities = [json.loads(c.function.arguments)["city"] for c in calls]  # type: ignore[union-attr]
    assert cities == ["Paris", "Oslo"] and calls[0].id != calls[1].id


async def test_an_unknown_function_is_content_counted_in_metrics(smollm2_weights: ModelWeights) -> None:
    rocket = CALL.replace("get_weather", "launch_rocket")
    async with scripted_smollm2(smollm2_weights, rocket) as server, server.client() as http:
        response = await http.post("/v1/chat/completions", json=request())
        metrics = (await http.get("/metrics")).text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == rocket
    assert re.search(r'gptoss_malformed_tool_calls_total\{[^}]*reason="unknown_function"\} 1\.0', metrics)


async def test_streamed_arguments_that_are_not_json_end_with_stop_and_are_counted(
    smollm2_weights: ModelWeights,
) -> None:
    broken = CALL.replace('"Paris"', "Paris")
    async with scripted_smollm2(smollm2_weights, broken) as server, server.client() as http:
        chunks = await sse_chunks(http, request())
        metrics = (await http.get("/metrics")).text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert re.search(r'gptoss_malformed_tool_calls_total\{[^}]*reason="invalid_arguments"\} 1\.0', metrics)


def hermes_tokenizer(weights: ModelWeights) -> Any:
    tokenizer = copy.copy(weights.tokenizer)
    tokenizer.chat_template = Path(HERMES).read_text()
    return tokenizer


def test_the_template_puts_the_tools_calls_and_results_in_the_prompt(smollm2_weights: ModelWeights) -> None:
    tokenizer = hermes_tokenizer(smollm2_weights)
    tools = (ToolSpec("get_weather", "The weather in a city", json.dumps(WEATHER["function"]["parameters"])),)
    messages = (
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "sunny", name="get_weather", tool_call_id="call_1"),
    )
    for offered in (tools, ()):  # tool_choice none after a call: the call still renders as a call
        prompt = tokenizer.decode(build_prompt_tokens(PromptSpec(messages=messages, tools=offered), tokenizer, False))
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
        assert "<tool_response>\nsunny\n</tool_response>" in prompt
        assert ('<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt) == bool(offered)
    assert smollm2_weights.tokenizer.chat_template != tokenizer.chat_template  # the weights' own is untouched


@pytest.fixture(scope="module")
def live(smollm2_weights: ModelWeights) -> Iterator[str]:
    with server_in_thread(smollm2_weights, server_config(model=MODEL, chat_template=HERMES)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("seed", [1, 2])
def test_auto_on_the_real_model_is_served_and_parsed(live: str, seed: int) -> None:
    with client(live) as openai_client:
        bare = openai_client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=1)
        completion = openai_client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER],
            tool_choice="auto",
            temperature=1.0,
            seed=seed,
            max_tokens=60,
        )
    # The tools are in the prompt: the template's tools section is longer than the function's schema.
    assert bare.usage is not None and completion.usage is not None
    assert completion.usage.prompt_tokens > bare.usage.prompt_tokens + 60
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    for call in choice.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)  # type: ignore[union-attr]
    assert choice.message.content is not None or choice.message.tool_calls


def test_auto_streams_on_the_real_model(live: str) -> None:
    with client(live) as openai_client:
        stream = openai_client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER],
            temperature=0,
            max_tokens=60,
            stream=True,
        )
        finishes = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finishes[-1] in ("stop", "length", "tool_calls")


def test_responses_still_refuse_auto_on_a_template_model(live: str) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    with client(live) as openai_client, pytest.raises(openai.BadRequestError) as refused:
        openai_client.responses.create(model=MODEL, input="Hi", tools=[tool], max_output_tokens=5)  # type: ignore[list-item]
    assert refused.value.status_code == 400 and refused.value.param == "tool_choice"
    assert "tool_choice 'required'" in refused.value.message


async def test_a_template_without_call_syntax_keeps_the_400(smollm2_weights: ModelWeights) -> None:
    # The Hermes template with --tool-call-parser none: nothing is read back, so auto is refused.
    settings = server_config(model=MODEL, chat_template=HERMES, tool_call_parser="none")
    async with running_server(smollm2_weights, settings) as server, server.client() as http:
        response = await http.post("/v1/chat/completions", json=request())
        forced = await http.post("/v1/chat/completions", json=request(tool_choice="required", max_tokens=60))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "--chat-template" in error["message"]
    assert forced.status_code == 200 and forced.json()["choices"][0]["message"]["tool_calls"]

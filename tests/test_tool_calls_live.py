"""Tool calls on a live server with the tiny gpt-oss, through the official ``openai`` client.

Its random weights never call a tool: a forward hook scripts the Harmony tokens of a call (see
tests/test_structured_outputs.py's ``scripted``), and everything after the model (the relay, the
text layer, the answer's shapes, the metrics) is the server's own.
"""

from __future__ import annotations

import json
import re

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from app.engine.loader import ModelWeights
from tests.conftest import RunningServer
from tests.scripted_harmony import scripted_server

CALL_ID = re.compile(r"call_[0-9a-f]{24}")
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Paris?"}]
CALL = (
    "<|channel|>analysis<|message|>I need the weather.<|end|><|start|>assistant"
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris","days":2}<|call|>'
)
ANSWER = (
    "<|channel|>analysis<|message|>It is sunny.<|end|><|start|>assistant<|channel|>final<|message|>Sunny.<|return|>"
)


def client(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


async def test_a_call_then_its_result_then_the_answer(tiny_weights: ModelWeights) -> None:
    """The whole round trip: the call, the tool's result sent back, the model's answer."""
    async with scripted_server(tiny_weights, CALL + ANSWER) as server, client(server) as openai_client:
        first = await openai_client.chat.completions.create(
            model="tiny-gpt-oss",
            messages=ASK,
            tools=[WEATHER],
            temperature=0,
            max_tokens=80,
            extra_body={"cache": False},
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls or []
        assert CALL_ID.fullmatch(call.id) and call.type == "function"
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
        assert choice.message.model_extra and choice.message.model_extra["reasoning"] == "I need the weather."
        history: list[ChatCompletionMessageParam] = [
            *ASK,
            choice.message.model_dump(include={"role", "content", "tool_calls"}),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky":"sunny"}'},
        ]
        second = await openai_client.chat.completions.create(
            model="tiny-gpt-oss", messages=history, tools=[WEATHER], temperature=0, max_tokens=40
        )
    assert second.choices[0].message.content == "Sunny."
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls


async def test_a_streamed_call_through_the_openai_client(tiny_weights: ModelWeights) -> None:
    async with scripted_server(tiny_weights, CALL) as server, client(server) as openai_client:
        stream = await openai_client.chat.completions.create(
            model="tiny-gpt-oss", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=80, stream=True
        )
        deltas, finish = [], None
        async for chunk in stream:
            for choice in chunk.choices:
                deltas.extend(choice.delta.tool_calls or [])
                finish = choice.finish_reason or finish
    opening, *fragments = deltas
    assert opening.index == 0 and opening.id and CALL_ID.fullmatch(opening.id) and opening.type == "function"
    assert opening.function is not None and opening.function.name == "get_weather"
    assert len(fragments) > 3 and all(f.id is None and f.index == 0 for f in fragments)
    arguments = "".join((f.function.arguments or "") for f in fragments if f.function)
    assert json.loads(arguments) == {"city": "Paris", "days": 2}
    assert finish == "tool_calls"


async def test_a_malformed_call_is_content_and_counted_in_metrics_and_stats(tiny_weights: ModelWeights) -> None:
    async with (
        scripted_server(tiny_weights, CALL.replace("get_weather", "launch_rocket")) as server,
        server.client() as http,
    ):
        body = {"messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 80}
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["message"]["content"] == '{"city":"Paris","days":2}' and choice["finish_reason"] == "stop"
        assert "tool_calls" not in choice["message"]
        stats = (await http.get("/stats")).json()
        metrics = (await http.get("/metrics")).text
    assert stats["model_metrics"]["tiny-gpt-oss"]["malformed_tool_calls"] == 1
    assert re.search(r'gptoss_malformed_tool_calls_total\{[^}]*reason="unknown_function"\} 1\.0', metrics)


async def test_a_cache_replay_of_a_call_gets_fresh_ids(tiny_weights: ModelWeights) -> None:
    body = {"messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 80}
    async with scripted_server(tiny_weights, CALL) as server, server.client() as http:
        first = (await http.post("/v1/chat/completions", json=body)).json()
        again = await http.post("/v1/chat/completions", json=body)
    assert again.headers["X-Cache"] == "HIT"
    ids = [r["choices"][0]["message"]["tool_calls"][0]["id"] for r in (first, again.json())]
    assert ids[0] != ids[1]
    assert again.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


TWO_CALLS = CALL.replace("<|call|>", "<|end|><|start|>assistant") + (
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Rome"}<|call|>'
)


async def test_parallel_tool_calls_false_answers_the_first_call_alone(tiny_weights: ModelWeights) -> None:
    async with scripted_server(tiny_weights, TWO_CALLS) as server, client(server) as openai_client:
        create = openai_client.chat.completions.with_raw_response.create
        one = await create(
            model="tiny-gpt-oss", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=99, parallel_tool_calls=False
        )
        # The script is spent: the same request with parallel calls is the model's own words,
        # and it must not be served the single call from the cache.
        both = await create(model="tiny-gpt-oss", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=99)
    choice = one.parse().choices[0]
    assert [c.function.arguments for c in choice.message.tool_calls or () if c.type == "function"] == [
        '{"city":"Paris","days":2}'
    ]
    assert choice.finish_reason == "tool_calls"
    assert both.headers["X-Cache"] != "HIT" and both.headers["X-Cache-Key"] != one.headers["X-Cache-Key"]
    assert not both.parse().choices[0].message.tool_calls


async def test_tool_mistakes_are_400s_naming_the_field(tiny_weights: ModelWeights) -> None:
    async with scripted_server(tiny_weights, "") as server, client(server) as openai_client:
        with pytest.raises(openai.BadRequestError) as caught:
            await openai_client.chat.completions.create(
                model="tiny-gpt-oss",
                messages=ASK,
                tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
    assert caught.value.status_code == 400
    assert caught.value.param == "tool_choice"

"""Tool calling on /v1/responses, live, through the official ``openai`` client, on the tiny gpt-oss.

Its random weights never call a tool by themselves (tests/test_forced_tool_call.py shows it with
tool_choice auto), so a call is either scripted Harmony tokens (tests/test_tool_calls_live.py's
``scripted_server``: everything after the model is the server's own) or the guaranteed call of
``tool_choice: required`` / a named function, whose arguments must validate against the schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from openai.types.responses import FunctionToolParam, ResponseFunctionToolCall, ResponseStreamEvent

from app.engine.loader import ModelWeights
from app.http.responses_schemas import chat_messages, normalize_item
from app.prompts.builder import ChatMessage, ToolCall
from tests.scripted_harmony import scripted_server
from tests.test_forced_tool_call import LOOKUP, PLAN
from tests.test_tool_calls_live import ANSWER, CALL, WEATHER, client

MODEL = "tiny-gpt-oss"
CALL_ID = re.compile(r"call_[0-9a-f]{24}")
ITEM_ID = re.compile(r"fc_[0-9a-f]{32}")
GET_WEATHER: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "Gets the weather",
    "parameters": WEATHER["function"].get("parameters"),
    "strict": False,
}
FORCED_TOOLS: list[FunctionToolParam] = [
    {"type": "function", "name": "get_weather", "parameters": PLAN, "strict": True},
    {"type": "function", "name": "look_up", "parameters": LOOKUP, "strict": True},
]
SCHEMAS = {"get_weather": PLAN, "look_up": LOOKUP}


async def test_a_call_then_its_output_via_previous_response_id_then_the_answer(tiny_weights: ModelWeights) -> None:
    """The round trip: a function_call item, stored; its output sent back on a chained turn; the
    answer. Both turns' prompts are exactly chat's for the same conversation (the same tokens)."""
    async with scripted_server(tiny_weights, CALL + ANSWER) as server, client(server) as api:
        first = await api.responses.create(
            model=MODEL,
            input="Weather in Paris?",
            tools=[GET_WEATHER],
            temperature=0,
            max_output_tokens=80,
            extra_body={"cache": False},
        )
        assert first.status == "completed"
        reasoning, call = first.output
        assert reasoning.type == "reasoning"
        assert isinstance(call, ResponseFunctionToolCall)
        assert call.id and ITEM_ID.fullmatch(call.id) and CALL_ID.fullmatch(call.call_id)
        assert call.name == "get_weather" and call.status == "completed"
        assert json.loads(call.arguments) == {"city": "Paris", "days": 2}
        assert [t.type for t in first.tools] == ["function"] and first.tool_choice == "auto"
        assert (await api.responses.retrieve(first.id)).output == first.output
        second = await api.responses.create(
            model=MODEL,
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"sky":"sunny"}'}],
            tools=[GET_WEATHER],
            temperature=0,
            max_output_tokens=40,
        )
        assert second.status == "completed" and second.output_text == "Sunny."
        assert [item.type for item in second.output] == ["reasoning", "message"]
        # The same conversation on chat: its prompt is the same tokens, call and result included,
        # and the reasoning that led to the call (it is still pending), given back as chat returned it.
        thought = "".join(part.text for part in reasoning.content or ())
        assert thought == "I need the weather."
        history: list[Any] = [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "reasoning": thought,
                "content": None,
                "tool_calls": [
                    {"id": call.call_id, "type": "function", "function": call.model_dump(include={"name", "arguments"})}
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": '{"sky":"sunny"}'},
        ]
        chat = await api.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=1)
        asked = await api.chat.completions.create(model=MODEL, messages=history[:1], tools=[WEATHER], max_tokens=1)
        history[1].pop("reasoning")
        without_reasoning = await api.chat.completions.create(
            model=MODEL, messages=history, tools=[WEATHER], max_tokens=1
        )
    assert first.usage and second.usage and chat.usage and asked.usage and without_reasoning.usage
    assert first.usage.input_tokens == asked.usage.prompt_tokens
    assert second.usage.input_tokens == chat.usage.prompt_tokens > first.usage.input_tokens
    assert chat.usage.prompt_tokens > without_reasoning.usage.prompt_tokens


async def test_a_streamed_call_is_typed_events_in_order(tiny_weights: ModelWeights) -> None:
    async with scripted_server(tiny_weights, CALL) as server, client(server) as api:
        stream = await api.responses.create(
            model=MODEL,
            input="Weather in Paris?",
            tools=[GET_WEATHER],
            temperature=0,
            max_output_tokens=80,
            stream=True,
        )
        events: list[ResponseStreamEvent] = [event async for event in stream]
        final = events[-1]
        assert final.type == "response.completed"
        stored = await api.responses.retrieve(final.response.id)
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    calls = [
        i for i, e in enumerate(events) if e.type == "response.output_item.added" and e.item.type == "function_call"
    ]
    [added_at] = calls
    added = events[added_at]
    assert added.type == "response.output_item.added" and isinstance(added.item, ResponseFunctionToolCall)
    assert added.item.arguments == "" and added.item.status == "in_progress" and added.output_index == 1
    assert kinds.index("response.reasoning_text.done") < added_at  # the reasoning item first
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 3 and all(d.item_id == added.item.id and d.output_index == 1 for d in deltas)
    assert "".join(d.delta for d in deltas) == done.arguments
    assert json.loads(done.arguments) == {"city": "Paris", "days": 2}
    assert added_at < kinds.index("response.function_call_arguments.delta")
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    item_done = events[-2]
    assert item_done.type == "response.output_item.done" and isinstance(item_done.item, ResponseFunctionToolCall)
    assert item_done.item.status == "completed" and item_done.item.arguments == done.arguments
    assert item_done.item.call_id == added.item.call_id and CALL_ID.fullmatch(added.item.call_id)
    assert stored.output == final.response.output and stored.output[1] == item_done.item


@pytest.mark.parametrize("seed", [1, 2])
async def test_required_always_makes_a_call_whose_arguments_validate(tiny_weights: ModelWeights, seed: int) -> None:
    """The guarantee, not a script: the random model, forced, calls one of the tools correctly."""
    async with scripted_server(tiny_weights, "") as server, client(server) as api:
        response = await api.responses.create(
            model=MODEL,
            input="Weather in Paris?",
            tools=FORCED_TOOLS,
            tool_choice="required",
            temperature=1.0,
            max_output_tokens=200,
            extra_body={"seed": seed},
        )
        named = await api.responses.create(
            model=MODEL,
            input="Weather in Paris?",
            tools=FORCED_TOOLS,
            tool_choice={"type": "function", "name": "look_up"},
            temperature=1.0,
            max_output_tokens=200,
            stream=True,
            extra_body={"seed": seed},
        )
        streamed = [event async for event in named]
    call = response.output[-1]
    assert response.status == "completed" and isinstance(call, ResponseFunctionToolCall)
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    assert response.tool_choice == "required"
    final = streamed[-1]
    assert final.type == "response.completed"
    forced = final.response.output[-1]
    assert isinstance(forced, ResponseFunctionToolCall) and forced.name == "look_up"
    jsonschema.validate(json.loads(forced.arguments), LOOKUP)
    [done] = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert done.arguments == forced.arguments


async def test_a_call_to_an_unknown_function_is_message_text_and_counted(tiny_weights: ModelWeights) -> None:
    async with (
        scripted_server(tiny_weights, CALL.replace("get_weather", "launch_rocket")) as server,
        server.client() as http,
    ):
        body = {"input": "Weather in Paris?", "tools": [GET_WEATHER], "temperature": 0, "max_output_tokens": 80}
        response = (await http.post("/v1/responses", json=body)).json()
        metrics = (await http.get("/metrics")).text
    assert [item["type"] for item in response["output"]] == ["reasoning", "message"]
    assert response["output"][1]["content"][0]["text"] == '{"city":"Paris","days":2}'
    assert re.search(r'gptoss_malformed_tool_calls_total\{[^}]*reason="unknown_function"\} 1\.0', metrics)


async def test_arguments_that_are_not_json_are_message_text_or_an_incomplete_item(tiny_weights: ModelWeights) -> None:
    broken = CALL.replace('{"city":"Paris","days":2}', '{"city": Paris')
    body = {"input": "Weather?", "tools": [GET_WEATHER], "temperature": 0, "max_output_tokens": 80}
    async with scripted_server(tiny_weights, broken + broken) as server, server.client() as http:
        answer = (await http.post("/v1/responses", json={**body, "cache": False})).json()
        streamed = await http.post("/v1/responses", json={**body, "stream": True, "cache": False})
        metrics = (await http.get("/metrics")).text
    assert [item["type"] for item in answer["output"]] == ["reasoning", "message"]
    assert answer["output"][1]["content"][0]["text"] == '{"city": Paris'
    final = json.loads(streamed.text.strip().split("\n\n")[-1].split("data: ", 1)[1])
    item = final["response"]["output"][1]
    assert item["type"] == "function_call" and item["status"] == "incomplete" and item["arguments"] == '{"city": Paris'
    assert re.search(r'gptoss_malformed_tool_calls_total\{[^}]*reason="invalid_arguments"\} 2\.0', metrics)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [GET_WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "not in tools"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [{"type": "teleport"}]}, "tools", "not a tool type"),
        ({"tools": [GET_WEATHER, GET_WEATHER]}, "tools", "two tools"),
        ({"tools": [{**GET_WEATHER, "name": "a.b"}]}, "tools", "pattern"),
        (
            {"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
            "input",
            "answers no earlier function_call",
        ),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input", "needs call_id"),
        (
            {"tools": [GET_WEATHER], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
            "tool_choice",
            "response format",
        ),
    ],
)
async def test_tool_mistakes_are_400s_naming_the_param(
    tiny_weights: ModelWeights, fields: dict[str, Any], param: str, words: str
) -> None:
    async with scripted_server(tiny_weights, "") as server, server.client() as http:
        response = await http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 5, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param) and words in error["message"], error


def test_call_items_become_the_assistants_calls_and_the_tools_results_in_order() -> None:
    items = [
        normalize_item(raw, "input")
        for raw in [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
            {"type": "function_call_output", "call_id": "c2", "output": "rain"},
            {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "sun"}]},
        ]
    ]
    assert items[1]["status"] == "completed" and items[4]["output"] == "sun"
    assert chat_messages(items) == (
        ChatMessage("user", "Weather in Paris and Rome?"),
        ChatMessage(
            "assistant",
            "",
            (ToolCall("c1", "get_weather", '{"city":"Paris"}'), ToolCall("c2", "get_weather", '{"city":"Rome"}')),
        ),
        ChatMessage("tool", "rain", (), "get_weather", "c2"),
        ChatMessage("tool", "sun", (), "get_weather", "c1"),
    )
    with pytest.raises(ValueError, match="answers no earlier"):
        chat_messages([items[4], *items[:2]])  # an output before its call


async def test_a_cache_replay_of_a_call_gets_fresh_ids(tiny_weights: ModelWeights) -> None:
    body = {"input": "Weather in Paris?", "tools": [GET_WEATHER], "temperature": 0, "max_output_tokens": 80}
    async with scripted_server(tiny_weights, CALL) as server, server.client() as http:
        first = (await http.post("/v1/responses", json=body)).json()
        again = await http.post("/v1/responses", json=body)
    assert again.headers["X-Cache"] == "HIT"
    calls = [response["output"][1] for response in (first, again.json())]
    assert calls[0]["name"] == calls[1]["name"] == "get_weather" and calls[0]["arguments"] == calls[1]["arguments"]
    assert calls[0]["call_id"] != calls[1]["call_id"] and calls[0]["id"] != calls[1]["id"]

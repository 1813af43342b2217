"""Forced tool calls on SmolLM2 (no Harmony): constrained JSON {"name", "arguments"}, answered
as a tool call, through the openai client and LangChain's ``bind_tools``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletionToolParam

from app.engine.loader import ModelWeights
from tests.conftest import server_config, server_in_thread

MODEL = "smollm2-135m"
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "celsius": {"type": "boolean"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_SCHEMA},
}
TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
}


@pytest.fixture(scope="module")
def live(smollm2_weights: ModelWeights) -> Iterator[str]:
    with server_in_thread(smollm2_weights, server_config(model=MODEL)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("seed", [1, 2])
def test_required_is_a_call_whose_arguments_follow_the_schema(live: str, seed: int) -> None:
    with client(live) as openai_client:
        completion = openai_client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=80,
        )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
    schema = WEATHER_SCHEMA if call.function.name == "get_weather" else TIME["function"]["parameters"]  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), schema)  # type: ignore[union-attr]


def test_a_named_function_streams_as_a_call(live: str) -> None:
    with client(live) as openai_client:
        stream = openai_client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What time is it?"}],
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            temperature=0,
            max_tokens=60,
            stream=True,
        )
        calls, finish = [], None
        for chunk in stream:
            for choice in chunk.choices:
                calls.extend(choice.delta.tool_calls or [])
                finish = choice.finish_reason or finish
    opening, *fragments = calls
    assert opening.id and opening.function and opening.function.name == "get_time"
    arguments = "".join(f.function.arguments or "" for f in fragments if f.function)
    assert json.loads(arguments)["zone"] in ("UTC", "CET") and finish == "tool_calls"


RESPONSE_TOOLS: list[Any] = [
    {"type": "function", "name": t["function"]["name"], "parameters": t["function"].get("parameters")}
    for t in (WEATHER, TIME)
]


@pytest.mark.parametrize("seed", [1, 2])
def test_required_on_the_responses_api_is_a_function_call_item(live: str, seed: int) -> None:
    with client(live) as openai_client:
        response = openai_client.responses.create(
            model=MODEL,
            input="What is the weather in Paris?",
            tools=RESPONSE_TOOLS,
            tool_choice="required",
            temperature=1.0,
            max_output_tokens=80,
            extra_body={"seed": seed},
        )
    assert response.status == "completed"
    [call] = response.output
    assert call.type == "function_call" and call.status == "completed" and call.call_id.startswith("call_")
    schema = WEATHER_SCHEMA if call.name == "get_weather" else TIME["function"]["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)


def test_a_named_function_streams_as_a_function_call_item(live: str) -> None:
    with client(live) as openai_client:
        stream = openai_client.responses.create(
            model=MODEL,
            input="What time is it?",
            tools=RESPONSE_TOOLS,
            tool_choice={"type": "function", "name": "get_time"},
            temperature=0,
            max_output_tokens=60,
            stream=True,
        )
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas and "".join(deltas) == done.arguments and json.loads(done.arguments)["zone"] in ("UTC", "CET")
    final = events[-1]
    assert final.type == "response.completed"
    [call] = final.response.output
    assert call.type == "function_call" and call.name == "get_time" and call.arguments == done.arguments


def test_auto_on_a_template_without_tools_is_a_400_that_says_so(live: str) -> None:
    with client(live) as openai_client, pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER], max_tokens=5
        )
    assert caught.value.status_code == 400 and "tool_choice 'required'" in caught.value.message
    with client(live) as openai_client, pytest.raises(openai.BadRequestError) as refused:
        openai_client.responses.create(model=MODEL, input="Hi", tools=RESPONSE_TOOLS, max_output_tokens=5)
    assert refused.value.status_code == 400 and refused.value.param == "tool_choice"


@tool
def get_weather(city: str, celsius: bool) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@tool
def get_time(zone: str) -> str:
    """The time in a zone."""
    return f"noon {zone}"


@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_langchain_bind_tools_gets_a_tool_call(live: str, choice: str) -> None:
    chat = ChatOpenAI(model=MODEL, base_url=f"{live}/v1", api_key="unused", temperature=0, max_completion_tokens=60)  # type: ignore[arg-type]
    bound = chat.bind_tools([get_weather, get_time], tool_choice=choice)
    reply = bound.invoke("What is the weather in Paris?")
    assert isinstance(reply, AIMessage)
    [call] = reply.tool_calls
    assert call["name"] in (("get_weather", "get_time") if choice == "required" else ("get_time",))
    assert isinstance(call["args"], dict) and call["id"] and call["id"].startswith("call_")
    tool_fn = get_weather if call["name"] == "get_weather" else get_time
    tool_fn.args_schema.model_validate(call["args"])  # type: ignore[union-attr]

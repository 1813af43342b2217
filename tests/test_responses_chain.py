"""A previous_response_id chain past a tool round trip keeps every earlier item (issue 24).

Three turns on the tiny gpt-oss with scripted Harmony tokens (tests/scripted_harmony.py): a call,
its output sent back and the answer, then a plain question. The third turn's prompt is exactly
chat's for the whole conversation, the tool's message included.

Breakage caught: a chain that dropped the function_call_output items of earlier turns (the third
turn's prompt silently lost the tool message; the round-trip test has two turns only).
"""

from __future__ import annotations

from typing import Any

from openai.types.responses import ResponseFunctionToolCall

from app.engine.loader import ModelWeights
from tests.scripted_harmony import scripted_server
from tests.test_responses_tools import GET_WEATHER, MODEL
from tests.test_tool_calls_live import ANSWER, CALL, WEATHER, client


async def test_the_third_turn_still_holds_the_first_turns_tool_output(tiny_weights: ModelWeights) -> None:
    async with scripted_server(tiny_weights, CALL + ANSWER) as server, client(server) as api:
        common: dict[str, Any] = {"model": MODEL, "tools": [GET_WEATHER], "temperature": 0}
        first = await api.responses.create(input="Weather in Paris?", max_output_tokens=80, **common)
        call = first.output[-1]
        assert isinstance(call, ResponseFunctionToolCall)
        result: Any = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky":"sunny"}'}
        second = await api.responses.create(
            previous_response_id=first.id, input=[result], max_output_tokens=40, **common
        )
        assert second.output_text == "Sunny."
        third = await api.responses.create(
            previous_response_id=second.id, input="And tomorrow?", max_output_tokens=1, **common
        )
        history: list[Any] = [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "reasoning": "I need the weather.",
                "content": None,
                "tool_calls": [
                    {"id": call.call_id, "type": "function", "function": call.model_dump(include={"name", "arguments"})}
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": '{"sky":"sunny"}'},
            {"role": "assistant", "reasoning": "It is sunny.", "content": "Sunny."},
            {"role": "user", "content": "And tomorrow?"},
        ]
        chat = await api.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=1)
        without_tool = [message for message in history if message["role"] != "tool"]
        lost = await api.chat.completions.create(model=MODEL, messages=without_tool, tools=[WEATHER], max_tokens=1)
    assert third.usage and chat.usage and lost.usage
    assert third.usage.input_tokens == chat.usage.prompt_tokens > lost.usage.prompt_tokens

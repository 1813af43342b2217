"""Tool calling's requests: the fields' checks, and the prompt gpt-oss and SmolLM2 get for them. Pure."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.engine.loader import ModelWeights
from app.http.errors import from_validation_error
from app.http.schemas import ChatCompletionRequest
from app.prompts.builder import build_prompt_tokens
from app.prompts.harmony_encoding import harmony_encoding

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALLED = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius":20}'},
]


def harmony_text(body: dict[str, Any]) -> str:
    request = ChatCompletionRequest.model_validate(body)
    spec = request.prompt_spec(request.messages, None)
    return str(harmony_encoding().decode(list(build_prompt_tokens(spec, None, True))))


def refused(body: dict[str, Any]) -> tuple[str | None, str]:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    error = from_validation_error(caught.value)
    assert error.status == 400
    return error.param, error.message


def test_tools_are_the_functions_namespace_and_calls_go_to_commentary() -> None:
    text = harmony_text({"messages": ASK, "tools": [WEATHER]})
    assert "Calls to these tools must go to the commentary channel: 'functions'.<|end|>" in text
    assert (
        "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
        "// Gets the weather\ntype get_weather = (_: {\ncity: string,\n}) => any;\n\n} // namespace functions<|end|>"
    ) in text


def test_tool_choice_none_renders_no_tools() -> None:
    assert harmony_text({"messages": ASK, "tools": [WEATHER], "tool_choice": "none"}) == harmony_text({"messages": ASK})
    assert "functions" not in harmony_text({"messages": ASK})


def test_a_call_and_its_result_go_back_in_as_harmony_messages() -> None:
    text = harmony_text({"messages": CALLED, "tools": [WEATHER]})
    assert text.endswith(
        "<|start|>user<|message|>Weather in Paris?<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city":"Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"celsius":20}<|end|>'
        "<|start|>assistant"
    )


def with_reasoning(messages: list[Any], field: str = "reasoning") -> list[dict[str, Any]]:
    """``messages`` with each assistant message's reasoning given back, as clients echo ours."""
    return [m | {field: f"thought {i}"} if m["role"] == "assistant" else m for i, m in enumerate(messages)]


def test_the_reasoning_that_led_to_a_pending_call_goes_back_in_before_it() -> None:
    for field in ("reasoning", "reasoning_content"):
        text = harmony_text({"messages": with_reasoning(CALLED, field), "tools": [WEATHER]})
        assert (
            "<|start|>user<|message|>Weather in Paris?<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>thought 1<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary"
        ) in text


def test_a_finished_turns_reasoning_is_dropped_calls_and_answer_alike() -> None:
    answer = {"role": "assistant", "content": "It is 20 degrees."}
    finished = [*CALLED, answer, {"role": "user", "content": "And Rome?"}]
    text = harmony_text({"messages": with_reasoning(finished), "tools": [WEATHER]})
    assert "<|channel|>analysis" not in text and "thought" not in text
    assert text == harmony_text({"messages": finished, "tools": [WEATHER]})
    # An answer, then a new call still pending: only the new call's reasoning is kept.
    again = [
        *finished,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c2", "content": '{"celsius":25}'},
    ]
    text = harmony_text({"messages": with_reasoning(again), "tools": [WEATHER]})
    assert text.count("<|channel|>analysis") == 1 and "thought 5" in text


def test_reasoning_items_before_a_function_call_are_kept_while_it_is_pending() -> None:
    from app.http.responses_schemas import ResponsesRequest, chat_messages

    items: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "I should call it."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"celsius":20}'},
    ]
    request = ResponsesRequest.model_validate({"input": items, "tools": [WEATHER | WEATHER["function"]]})
    messages = chat_messages(request.input_items())
    assert [m.reasoning for m in messages] == ["", "I should call it.", ""]


def test_the_tool_fields_are_checked_with_a_400_that_names_them() -> None:
    unknown = {"type": "function", "function": {"name": "x"}}
    assert refused({"messages": ASK, "tools": [WEATHER], "tool_choice": unknown})[0] == "tool_choice"
    assert refused({"messages": ASK, "tool_choice": "required"})[0] == "tool_choice"
    bad_name = {"type": "function", "function": {"name": "has space"}}
    assert refused({"messages": ASK, "tools": [bad_name]})[0] == "tools.0.function.name"
    assert refused({"messages": ASK, "tools": [{"type": "code_interpreter"}]})[0].startswith("tools.0")  # type: ignore[union-attr]
    assert refused({"messages": ASK, "tools": [WEATHER, WEATHER]})[0] == "tools"
    param, message = refused({"messages": [*ASK, {"role": "tool", "tool_call_id": "nope", "content": "1"}]})
    assert param == "messages" and "answers no earlier tool call" in message


def test_smollm2s_template_cannot_render_tools_so_they_are_told_in_a_system_message(
    smollm2_weights: ModelWeights,
) -> None:
    request = ChatCompletionRequest.model_validate({"messages": CALLED, "tools": [WEATHER]})
    spec = request.prompt_spec(request.messages, None)
    text = str(smollm2_weights.tokenizer.decode(list(build_prompt_tokens(spec, smollm2_weights.tokenizer, False))))
    assert text.startswith('<|im_start|>system\nYou can call these functions:\n{"name": "get_weather"')
    assert '<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Paris"}}<|im_end|>' in text
    assert '<|im_start|>tool\n{"celsius":20}<|im_end|>\n<|im_start|>assistant\n' in text

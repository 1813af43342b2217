"""A forced tool call (tool_choice ``required`` or a named function) on the tiny gpt-oss: its
random weights never call a tool by themselves, so every valid call it makes is the grammar's."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from app.engine.loader import ModelWeights
from app.prompts.harmony_encoding import harmony_encoding
from tests.conftest import RunningServer
from tests.scripted_harmony import scripted_server

PLAN: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo", "Rome"]}, "celsius": {"type": "boolean"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
LOOKUP: dict[str, Any] = {
    "type": "object",
    "properties": {"topic": {"enum": ["sky", "sea"]}},
    "required": ["topic"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": PLAN}},
    {"type": "function", "function": {"name": "look_up", "parameters": LOOKUP}},
]
SCHEMAS = {"get_weather": PLAN, "look_up": LOOKUP}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


async def forced(server: RunningServer, **fields: Any) -> dict[str, Any]:
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 200, **fields}
    async with server.client() as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice: dict[str, Any] = response.json()["choices"][0]
    return choice


def check_call(choice: dict[str, Any], names: set[str]) -> dict[str, Any]:
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] in names
    arguments: dict[str, Any] = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, SCHEMAS[call["function"]["name"]])
    return call


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_required_always_makes_a_valid_call(tiny_weights: ModelWeights, seed: int) -> None:
    async with scripted_server(tiny_weights, "") as server:
        choice = await forced(server, tool_choice="required", temperature=1.0, seed=seed)
    check_call(choice, {"get_weather", "look_up"})


async def test_left_to_itself_the_tiny_model_never_calls(tiny_weights: ModelWeights) -> None:
    """What makes the tests above mean something: with tool_choice auto, the same seeds call nothing."""
    async with scripted_server(tiny_weights, "") as server:
        for seed in (1, 2, 3):
            choice = await forced(server, tool_choice="auto", temperature=1.0, seed=seed, max_tokens=60)
            assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "length"


async def test_a_named_function_is_the_one_called(tiny_weights: ModelWeights) -> None:
    async with scripted_server(tiny_weights, "") as server:
        for seed in (4, 5):
            named = {"type": "function", "function": {"name": "look_up"}}
            choice = await forced(server, tool_choice=named, temperature=1.0, seed=seed)
            check_call(choice, {"look_up"})
        streamed = await stream_call(server, named)
    assert streamed["name"] == "look_up"
    jsonschema.validate(json.loads(streamed["arguments"]), LOOKUP)


async def stream_call(server: RunningServer, choice: Any) -> dict[str, str]:
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 200, "tool_choice": choice, "stream": True, "seed": 6}
    name, arguments, finish = "", "", None
    async with server.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            for delta_choice in json.loads(line[6:])["choices"]:
                for call in delta_choice.get("delta", {}).get("tool_calls", []):
                    name += call["function"].get("name", "")
                    arguments += call["function"].get("arguments", "")
                finish = delta_choice.get("finish_reason") or finish
    assert finish == "tool_calls"
    return {"name": name, "arguments": arguments}


async def test_an_analysis_that_would_run_forever_is_closed_at_its_budget(tiny_weights: ModelWeights) -> None:
    """The script never ends its analysis: low effort's budget (256 tokens) closes it, then the call."""
    assert len(harmony_encoding().encode(" think", allowed_special=set())) == 1
    script = "<|channel|>analysis<|message|>" + " think" * 1000
    async with scripted_server(tiny_weights, script) as server:
        choice = await forced(server, tool_choice="required", reasoning_effort="low", max_tokens=600, temperature=0)
    check_call(choice, {"get_weather", "look_up"})
    assert choice["message"]["reasoning"] == " think" * 256


async def test_the_budget_leaves_room_for_the_call_within_max_tokens(tiny_weights: ModelWeights) -> None:
    script = "<|channel|>analysis<|message|>" + " think" * 1000
    async with scripted_server(tiny_weights, script) as server:
        choice = await forced(server, tool_choice="required", reasoning_effort="high", max_tokens=160, temperature=0)
    check_call(choice, {"get_weather", "look_up"})
    assert choice["message"]["reasoning"] == " think" * (160 - 128)


def test_the_call_structure_step_by_step(tiny_weights: ModelWeights) -> None:
    """The engine's ToolCallGrammar alone: what each step allows, the budget, the names' trie."""
    from app.contract.grammar import GrammarSpec
    from app.engine.loader import grammar_compiler
    from app.engine.tool_call_grammar import ToolCallGrammar, call_header

    vocab = int(tiny_weights.model.config.vocab_size)
    compiler = grammar_compiler(tiny_weights, vocab)
    source = json.dumps([["get_weather", PLAN], ["look_up", LOOKUP]], sort_keys=True)
    grammar = compiler.sequence_grammar(GrammarSpec("tool_call", source, reasoning_budget=2))
    assert isinstance(grammar, ToolCallGrammar)
    encoding = harmony_encoding()

    def allowed() -> set[int]:
        row = torch.zeros(vocab)
        grammar.restrict(row)
        return {int(i) for i in torch.nonzero(torch.isfinite(row)).flatten()}

    def ids(text: str) -> list[int]:
        return list(encoding.encode(text, allowed_special="all"))

    for token in ids("<|channel|>analysis<|message|>"):
        assert allowed() == {token}
        assert grammar.accept(token)
    (end,) = ids("<|end|>")
    (call,) = ids("<|call|>")
    text_allowed = allowed()
    assert end in text_allowed and call not in text_allowed and len(text_allowed) > 1000
    assert grammar.accept(ids(" hm")[0]) and grammar.accept(ids(" ok")[0])
    assert allowed() == {end}  # the budget (2) is spent: the analysis closes
    assert grammar.accept(end)
    weather, look = ids(call_header("get_weather")), ids(call_header("look_up"))
    shared = next(i for i, (a, b) in enumerate(zip(weather, look, strict=False)) if a != b)
    for token in weather[:shared]:
        assert allowed() == {token} and grammar.accept(token)
    assert allowed() == {weather[shared], look[shared]}  # the model picks the name
    assert not grammar.accept(ids("x")[0])  # off the structure: the row fails

"""Namespace tools and hosted tools on /v1/responses (app/http/responses_tools.py).

Pure first: a namespace is a Harmony namespace of its own in the developer message, a call to one
goes back into the prompt to ``NAMESPACE.NAME``, hosted tools reach no prompt, and the writer names
a namespaced call by ``namespace`` and ``name`` (the shape Codex CLI parses). Then live, on the
tiny gpt-oss: a scripted namespaced call through the openai client (streamed and not), a forced
one (the call grammar's header names the namespace), hosted tools accepted but not offered, and
the 400s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai.types.responses import ResponseFunctionToolCall

from actors.messages import StreamDone, StreamToken, Timings, Usage
from app.engine.loader import ModelWeights
from app.http.responses_format import ResponseHead, ResponseWriter
from app.http.responses_schemas import ResponsesRequest, chat_messages
from app.prompts.builder import PromptSpec, build_prompt_tokens
from app.prompts.harmony_encoding import harmony_encoding
from tests.conftest import server_in_thread
from tests.scripted_harmony import answered_and_streamed, scripted_server
from tests.test_tool_calls_live import client

MODEL = "tiny-gpt-oss"
TARGET = {"type": "object", "properties": {"target": {"type": "string"}}, "required": ["target"]}
# Short whatever the random model picks: a forced call's arguments end well inside max_output_tokens.
ONE_OF = {
    "type": "object",
    "properties": {"target": {"enum": ["a1", "a2"]}},
    "required": ["target"],
    "additionalProperties": False,
}
AGENTS = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Tools for spawning and managing sub-agents.",
    "tools": [
        {"type": "function", "name": "close_agent", "description": "Close an agent.", "parameters": TARGET},
        {"type": "function", "name": "wait_agent", "description": "Wait for an agent.", "parameters": ONE_OF},
    ],
}
EXEC = {"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {}}}
WEB_SEARCH = {"type": "web_search", "external_web_access": False}
CLOSE = (
    "<|channel|>analysis<|message|>Close it.<|end|><|start|>assistant"
    '<|channel|>commentary to=multi_agent_v1.close_agent <|constrain|>json<|message|>{"target":"a1"}<|call|>'
)


def prompt_text(body: dict[str, Any]) -> str:
    request = ResponsesRequest.model_validate(body)
    spec = PromptSpec(messages=chat_messages(request.input_items()), tools=request.tool_use().tools)
    return harmony_encoding().decode(list(build_prompt_tokens(spec, None, harmony=True)))


def test_a_namespace_is_a_harmony_namespace_of_its_own_and_hosted_tools_reach_no_prompt() -> None:
    text = prompt_text({"input": "Hi", "tools": [EXEC, AGENTS, WEB_SEARCH]})
    assert "namespace functions {" in text and "type exec_command = " in text
    assert "## multi_agent_v1\n\n// Tools for spawning and managing sub-agents.\nnamespace multi_agent_v1 {" in text
    assert "// Close an agent.\ntype close_agent = (_: {\ntarget: string,\n}) => any;" in text
    assert "web_search" not in text and "external_web_access" not in text
    assert text == prompt_text({"input": "Hi", "tools": [EXEC, AGENTS]})


def test_a_namespaced_call_goes_back_in_to_its_namespace() -> None:
    text = prompt_text(
        {
            "tools": [AGENTS],
            "input": [
                {"role": "user", "content": "Close a1."},
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "namespace": "multi_agent_v1",
                    "name": "close_agent",
                    "arguments": '{"target":"a1"}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "closed"},
            ],
        }
    )
    assert "<|start|>assistant to=multi_agent_v1.close_agent<|channel|>commentary <|constrain|>json" in text
    assert "<|start|>multi_agent_v1.close_agent to=assistant<|channel|>commentary<|message|>closed<|end|>" in text


def test_the_writer_names_a_namespaced_call_by_namespace_and_name() -> None:
    head = ResponseHead("resp_" + "a" * 32, 1, "m", {}, input_tokens=10, cached=False)
    out = ResponseWriter(head, frozenset({"multi_agent_v1.close_agent"}), streaming=True)
    events = out.opening()
    for index, text in enumerate(['{"target":', '"a1"}']):
        events += out.token(StreamToken(text, 1, index, "commentary", recipient="multi_agent_v1.close_agent"))
    events += out.done(StreamDone("r", "stop", Usage(10, 2), Timings(0.0, 1.0, 1.0, 2.0)))
    [added] = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    [call] = out.response()["output"]
    for item in (added, call):
        assert item["namespace"] == "multi_agent_v1" and item["name"] == "close_agent"
    assert call["arguments"] == '{"target":"a1"}' and call["status"] == "completed"


def test_a_json_call_to_a_namespaced_function_is_named_the_same_way() -> None:
    """A model without Harmony, forced: its JSON names the function by its qualified name."""
    head = ResponseHead("resp_" + "a" * 32, 1, "m", {}, input_tokens=10, cached=False)
    out = ResponseWriter(head, frozenset({"multi_agent_v1.close_agent"}), json_call=True)
    out.opening()
    for index, text in enumerate(['{"name": "multi_agent_v1.close_agent", ', '"arguments": {"target": "a1"}}']):
        out.token(StreamToken(text, 1, index))
    out.done(StreamDone("r", "stop", Usage(10, 2), Timings(0.0, 1.0, 1.0, 2.0)))
    [call] = out.response()["output"]
    assert (call["namespace"], call["name"], call["arguments"]) == ("multi_agent_v1", "close_agent", '{"target": "a1"}')


async def test_a_scripted_namespaced_call_reaches_the_client_streamed_and_not(tiny_weights: ModelWeights) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "input": "Close agent a1.",
        "tools": [EXEC, AGENTS, WEB_SEARCH],
        "max_output_tokens": 60,
        "extra_body": {"cache": False},
    }
    async with scripted_server(tiny_weights, CLOSE + CLOSE) as server, client(server) as api:
        answer, events = await answered_and_streamed(api, body)
    _, call = answer.output
    assert isinstance(call, ResponseFunctionToolCall) and answer.status == "completed"
    assert (call.namespace, call.name) == ("multi_agent_v1", "close_agent")
    assert json.loads(call.arguments) == {"target": "a1"}
    assert [tool.type for tool in answer.tools] == ["function", "namespace", "web_search"]
    [done] = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert isinstance(done, ResponseFunctionToolCall)
    assert (done.namespace, done.name) == ("multi_agent_v1", "close_agent")


@pytest.fixture(scope="module")
def live(tiny_weights: ModelWeights) -> Iterator[str]:
    with server_in_thread(tiny_weights) as url:
        yield url


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120) as http:
        return http.post("/v1/responses", json={"model": MODEL, "input": "Hi", **body})


def test_a_forced_call_to_a_namespaced_function_names_its_namespace(live: str) -> None:
    choice = {"type": "function", "name": "wait_agent", "namespace": "multi_agent_v1"}
    response = post(live, {"tools": [EXEC, AGENTS], "tool_choice": choice, "max_output_tokens": 120, "seed": 1})
    assert response.status_code == 200, response.text
    call = response.json()["output"][-1]
    assert (call["type"], call.get("namespace"), call["name"]) == ("function_call", "multi_agent_v1", "wait_agent")
    assert json.loads(call["arguments"])["target"] in ("a1", "a2") and call["status"] == "completed"
    assert response.json()["tool_choice"] == choice


def test_hosted_tools_are_accepted_echoed_and_not_offered(live: str) -> None:
    hosted = [WEB_SEARCH, {"type": "file_search", "vector_store_ids": ["vs_1"]}, {"type": "code_interpreter"}]
    with_hosted = post(live, {"tools": [EXEC, *hosted], "max_output_tokens": 1})
    without = post(live, {"tools": [EXEC], "max_output_tokens": 1})
    assert with_hosted.status_code == 200, with_hosted.text
    assert with_hosted.json()["tools"][1:] == hosted
    assert with_hosted.json()["usage"]["input_tokens"] == without.json()["usage"]["input_tokens"]


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [{"type": "teleport"}]}, "tools", "not a tool type"),
        ({"tools": [{"type": "custom", "name": "patch"}]}, "tools", "custom"),
        ({"tools": [{**AGENTS, "tools": [WEB_SEARCH]}]}, "tools", "function tools only"),
        ({"tools": [{**AGENTS, "tools": [AGENTS]}]}, "tools", "function tools only"),
        ({"tools": [{**AGENTS, "tools": []}]}, "tools", "at least 1"),
        ({"tools": [{**AGENTS, "name": "functions"}]}, "tools", "cannot be named"),
        ({"tools": [AGENTS, AGENTS]}, "tools", "two namespaces"),
        ({"tools": [WEB_SEARCH], "tool_choice": {"type": "web_search_preview"}}, "tool_choice", "hosted tool"),
        ({"tools": [{"type": "file_search"}], "tool_choice": {"type": "file_search"}}, "tool_choice", "hosted tool"),
        ({"tools": [WEB_SEARCH], "tool_choice": "required"}, "tool_choice", "needs function tools"),
        ({"tools": [AGENTS], "tool_choice": {"type": "function", "name": "close_agent"}}, "tool_choice", "not in"),
        ({"tools": [EXEC], "tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice", "allowed_tools"),
    ],
)
def test_tool_mistakes_are_400s_in_openais_shape(live: str, fields: dict[str, Any], param: str, words: str) -> None:
    response = post(live, {"max_output_tokens": 1, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and isinstance(error["code"], str)
    assert error["param"].startswith(param) and words in error["message"], error

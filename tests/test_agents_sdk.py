"""The openai-agents SDK end to end against a live server, on the tiny gpt-oss.

An ``Agent`` with one ``@function_tool`` and ``ModelSettings(tool_choice="required")``, run by
``Runner.run`` on asyncio in a worker thread (its own loop) while the server runs on the test's
trio loop. The tiny model's random weights never call a tool by themselves
(tests/test_forced_tool_call.py), so the first turn's call is the server's guarantee, not a
script: the tool runs, with arguments that validate against the schema the SDK made for it. Its
output goes back to the server (Responses: a ``function_call_output`` item; chat: a ``tool``
message), and the SDK, having reset ``tool_choice`` once the tool was used
(``Agent.reset_tool_choice``), asks for the answer with ``auto``.

The final turn is scripted: the random model never ends an answer by itself (it writes no
``<|return|>``), and an answer cut at ``max_tokens`` is a Responses status ``incomplete``, which
the SDK raises as a ModelBehaviorError. So the tool, when it runs, arms a forward hook on the LM
head that makes the next forward passes write ``<|channel|>final<|message|>Sunny.<|return|>``:
the loop then ends by itself on that answer, with the tool's output sent back first (checked in
the stored input items), and ``stop_on_first_tool``, which would never send it back, is not
needed. ``max_turns=3`` bounds the loop should it not end.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Literal

import httpx
import jsonschema
import torch
import trio
from agents import (
    Agent,
    FunctionTool,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.models.interface import Model
from agents.result import RunResultBase
from openai import AsyncOpenAI

from app.contract.model import ServedModel
from app.engine.loader import ModelWeights
from tests.conftest import RunningServer, running_server
from tests.scripted_harmony import harmony_tokens, scripted

set_tracing_disabled(True)  # the SDK's traces would go to OpenAI's servers: none leave this machine
MODEL = "tiny-gpt-oss"


FINAL = "<|channel|>final<|message|>Sunny.<|return|>"


class ArmedScript:
    """A forward hook on the LM head that passes the model's logits through until armed, then
    writes FINAL (tests/test_structured_outputs.py's ``scripted``)."""

    def __init__(self) -> None:
        self.script: Any = None

    def arm(self) -> None:
        self.script = scripted(harmony_tokens(FINAL))

    def __call__(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output if self.script is None else self.script(module, args, output)


def agent_run(
    url: str, make_model: Callable[[AsyncOpenAI], Model], armed: ArmedScript, *, streamed: bool = False
) -> tuple[RunResultBase, list[str], FunctionTool]:
    """One Runner.run (or run_streamed, its events read to the end) on a fresh asyncio loop (this
    thread's own), its client closed after."""
    calls: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo", "Rome"], celsius: bool) -> str:
        """The weather in a city."""
        calls.append(json.dumps({"city": city, "celsius": celsius}))
        armed.arm()  # the next turn (the answer) is scripted: see the module's docstring
        return f"sunny in {city}"

    async def run() -> RunResultBase:
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as api:
            agent = Agent(
                name="forecaster",
                instructions="Answer with the weather.",
                tools=[get_weather],
                model=make_model(api),
                model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=160),
            )
            if not streamed:
                return await Runner.run(agent, "Weather in Paris?", max_turns=3)
            result = Runner.run_streamed(agent, "Weather in Paris?", max_turns=3)
            kinds = [event.type async for event in result.stream_events()]
            assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
            return result

    return asyncio.run(run()), calls, get_weather


def check(result: RunResultBase, calls: list[str], tool: FunctionTool) -> None:
    [arguments] = calls  # the tool ran once: the forced call reached it
    jsonschema.validate(json.loads(arguments), tool.params_json_schema)
    kinds = [item.type for item in result.new_items]
    assert kinds[kinds.index("tool_call_item") + 1] == "tool_call_output_item"
    assert kinds[-1] == "message_output_item"  # the loop ended on an answer in words
    assert result.final_output == "Sunny."
    assert len(result.raw_responses) == 2  # the call, then the answer: no turn beyond


async def served(tiny_weights: ModelWeights, test: Callable[[RunningServer, ArmedScript], Any]) -> None:
    armed, handles = ArmedScript(), []

    def hook_in(loaded: ServedModel) -> ServedModel:
        model = loaded.runner.model  # type: ignore[attr-defined]
        handles.append(model.get_output_embeddings().register_forward_hook(armed))
        return loaded

    try:
        async with running_server(tiny_weights, runner_hook=hook_in) as server:
            await trio.to_thread.run_sync(test, server, armed)
    finally:
        for handle in handles:
            handle.remove()


async def test_an_agent_on_the_responses_api_calls_its_tool_and_finishes(tiny_weights: ModelWeights) -> None:
    def test(server: RunningServer, armed: ArmedScript) -> None:
        result, calls, tool = agent_run(server.url, lambda api: OpenAIResponsesModel(MODEL, api), armed)
        check(result, calls, tool)
        first, second = result.raw_responses
        [call] = [item for item in first.output if item.type == "function_call"]
        assert call.name == "get_weather" and json.loads(call.arguments) == json.loads(calls[0])
        # The SDK sent the call and the tool's output back as input items: the server stored them.
        assert second.response_id is not None
        with httpx.Client(base_url=server.url, timeout=30) as http:
            page = http.get(f"/v1/responses/{second.response_id}/input_items", params={"order": "asc"}).json()
        [output] = [item for item in page["data"] if item["type"] == "function_call_output"]
        city = json.loads(calls[0])["city"]
        assert output["call_id"] == call.call_id and output["output"] == f"sunny in {city}"
        assert [item["type"] for item in page["data"]].index("function_call") < page["data"].index(output)

    await served(tiny_weights, test)


async def test_a_streamed_agent_run_reads_the_call_from_the_typed_events(tiny_weights: ModelWeights) -> None:
    """run_streamed: the SDK builds the call from our response.function_call_arguments events."""

    def test(server: RunningServer, armed: ArmedScript) -> None:
        result, calls, tool = agent_run(server.url, lambda api: OpenAIResponsesModel(MODEL, api), armed, streamed=True)
        check(result, calls, tool)

    await served(tiny_weights, test)


async def test_an_agent_on_chat_completions_calls_its_tool_and_finishes(tiny_weights: ModelWeights) -> None:
    def test(server: RunningServer, armed: ArmedScript) -> None:
        result, calls, tool = agent_run(server.url, lambda api: OpenAIChatCompletionsModel(MODEL, api), armed)
        check(result, calls, tool)
        first, second = (response.usage.input_tokens for response in result.raw_responses)
        assert second > first  # the call and its result went back into the prompt

    await served(tiny_weights, test)

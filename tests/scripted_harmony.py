"""Scripted Harmony output on the random tiny gpt-oss: a forward hook names the model's next
tokens outright, so that the tests can drive what the random weights never write by themselves
(an analysis that ends, a final channel, a tool call), then let the real model go on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from openai import AsyncOpenAI
from openai.types.responses import Response

from app.config import ServerConfig
from app.contract.model import ServedModel
from app.engine.loader import ModelWeights
from app.prompts.harmony_encoding import harmony_encoding
from tests.conftest import RunningServer, running_server

# The analysis ends and the final channel opens: what follows is the model's own answer.
THEN_FINAL = "<|channel|>analysis<|message|>Thinking about colors.<|end|><|start|>assistant<|channel|>final<|message|>"


def harmony_tokens(text: str) -> list[int]:
    return list(harmony_encoding().encode(text, allowed_special="all"))


def scripted(tokens: list[int]) -> Any:
    """A forward hook on the LM head: the first ``len(tokens)`` logits it gives name the script's
    next token outright (a batch of one), then the model's own logits go through untouched."""
    pending = list(tokens)

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not pending:
            return output
        token = pending.pop(0)
        forced = torch.full_like(output, -1e4)
        forced[..., token] = 1e4
        return forced

    return hook


@asynccontextmanager
async def scripted_server(
    weights: ModelWeights,
    text: str,
    config: ServerConfig | None = None,
    wrap_asgi: Callable[[Any], Any] | None = None,
) -> AsyncIterator[RunningServer]:
    """A server whose model writes ``text`` (its forward passes, in order, from the first)."""
    handles = []

    def hook_in(loaded: ServedModel) -> ServedModel:
        model = loaded.runner.model  # type: ignore[attr-defined]
        handles.append(model.get_output_embeddings().register_forward_hook(scripted(harmony_tokens(text))))
        return loaded

    try:
        async with running_server(weights, config, runner_hook=hook_in, wrap_asgi=wrap_asgi) as server:
            yield server
    finally:
        for handle in handles:
            handle.remove()


async def answered_and_streamed(api: AsyncOpenAI, body: dict[str, Any]) -> tuple[Response, list[Any]]:
    """One body on /v1/responses twice: answered whole, then streamed (a script written twice)."""
    answer = await api.responses.create(**body)
    stream = await api.responses.create(**body, stream=True)
    return answer, [event async for event in stream]

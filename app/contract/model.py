"""The served model as the pipeline and the HTTP layer see it (app.engine.loader.LoadedModel is one)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from app.contract.grammar import GrammarService
from app.contract.sampling import SamplingDefaults
from app.contract.step import StepBackend

# How a chat template writes tool calls, read back by app.text.template_calls.
CallSyntax = Literal["hermes", "llama3_json"]


@dataclass(frozen=True, slots=True)
class MemoryPool:
    """Memory the runner reserved at start-up and holds for its whole life (/health, /stats)."""

    name: str  # "kv_cache", "prefix_cache", "grammar_masks"
    bytes: int
    figures: tuple[tuple[str, int], ...] = ()  # what it is made of: ("rows", 16), ("pages", 728), ...


class ServedModel(Protocol):
    @property
    def model_id(self) -> str: ...

    @property
    def aliases(self) -> tuple[str, ...]: ...

    @property
    def model_size(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def max_context(self) -> int: ...

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits: every token id is below it."""
        ...

    @property
    def harmony(self) -> bool:
        """gpt-oss: prompts are Harmony conversations and the output has channels."""
        ...

    @property
    def tool_call_syntax(self) -> CallSyntax | None:
        """How the model's chat template writes tool calls ("hermes", "llama3_json"), read back
        for tool_choice auto; None: no syntax is read (gpt-oss's calls are Harmony messages)."""
        ...

    @property
    def stop_token_ids(self) -> frozenset[int]: ...

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """What a request that leaves a sampling field (or max_tokens) out gets."""
        ...

    @property
    def tokenizer(self) -> Any:
        """What app.prompts.builder renders chat templates and raw prompts with."""
        ...

    @property
    def runner(self) -> StepBackend: ...

    @property
    def grammars(self) -> GrammarService | None:
        """Compiles response formats for this model's tokenizer (None: structured outputs off)."""
        ...

    @property
    def decode_path(self) -> str: ...

    @property
    def memory_pools(self) -> tuple[MemoryPool, ...]:
        """What was reserved at start-up (the KV cache, the prefix cache's pool, ...)."""
        ...

    @property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for: a prompt's size bounds its token count."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (part of a UTF-8 character, for some): logprobs show them."""
        ...

"""The served model as the pipeline and the HTTP layer see it (app.engine.loader.LoadedModel is one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from app.contract.step import StepBackend


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
    def harmony(self) -> bool:
        """gpt-oss: prompts are Harmony conversations and the output has channels."""
        ...

    @property
    def stop_token_ids(self) -> frozenset[int]: ...

    @property
    def tokenizer(self) -> Any:
        """What app.prompts.builder renders chat templates and raw prompts with."""
        ...

    @property
    def runner(self) -> StepBackend: ...

    @property
    def decode_path(self) -> str: ...

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes are 0 to vocab_size - 1 (its embedding's rows)."""
        ...

    @property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for: a prompt's size bounds its token count."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

"""What a request constrains its output to: a grammar, as plain data (no engine, no torch).

The HTTP layer turns ``response_format`` and vLLM's ``structured_outputs`` into a GrammarSpec and
has the served model's grammar service compile it (a bad one is a 400 before any work starts);
the runner gives each constrained sequence its own matcher over the compiled grammar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

GrammarKind = Literal["json_object", "json_schema", "regex", "choice"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    kind: GrammarKind
    # json_schema: the schema as canonical JSON (sorted keys); regex: the pattern; choice: a JSON
    # list of the allowed strings; json_object: "".
    source: str = ""
    # Harmony: the constraint holds on the ``final`` channel only; the analysis runs free first.
    final_channel_only: bool = False


class GrammarError(ValueError):
    """The grammar cannot be compiled (an invalid schema, a feature the engine lacks): a 400."""


class GrammarService(Protocol):
    """Compiles grammars for one tokenizer; compiled ones are cached by spec (bounded)."""

    def check(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` (or find it cached); GrammarError when it cannot be served."""
        ...

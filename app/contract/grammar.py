"""What a request constrains its output to: a grammar, as plain data (no engine, no torch).

The HTTP layer turns ``response_format`` and vLLM's ``structured_outputs`` into a GrammarSpec and
has the served model's grammar service compile it (a bad one is a 400 before any work starts);
the runner gives each constrained sequence its own matcher over the compiled grammar. Compiling
can take seconds: the prompt thread only asks whether a grammar is compiled (GrammarPending when
not), and the compile itself runs elsewhere, bounded in time (app.http.streams.off_loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

GrammarKind = Literal["json_object", "json_schema", "regex", "choice", "tool_call"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    kind: GrammarKind
    # json_schema: the schema as canonical JSON (sorted keys); regex: the pattern; choice: a JSON
    # list of the allowed strings; json_object: ""; tool_call (Harmony only): a JSON list of
    # [name, parameters schema] pairs, the functions a forced call picks from.
    source: str = ""
    # Harmony: the constraint holds on the ``final`` channel only; the analysis runs free first.
    final_channel_only: bool = False
    # tool_call: analysis tokens the model may write before the runner closes its analysis and
    # the call begins (so that the call fits in max_tokens).
    reasoning_budget: int = 0


class GrammarError(ValueError):
    """The grammar cannot be compiled (an invalid schema, a feature the engine lacks): a 400."""


class GrammarUnavailable(GrammarError):
    """The grammar engine itself failed (its worker could not start): the server's fault, a 503,
    and nothing is remembered about the grammar."""


class GrammarPending(Exception):
    """The grammar was never compiled: ``compile()`` does it (blocking, bounded in time), then the
    work that raised this can run again and find it compiled, or refused."""

    def __init__(self, compile: Callable[[], None]) -> None:
        super().__init__("the grammar must be compiled first")
        self.compile = compile


class GrammarService(Protocol):
    """Compiles grammars for one tokenizer; compiled ones are cached by spec (bounded), and so are
    those that cannot be (with their reason)."""

    def check(self, spec: GrammarSpec) -> None:
        """Compile ``spec`` (or find it cached); GrammarError when it cannot be served. Blocks for
        up to the compile timeout: never in the prompt thread."""
        ...

    def check_compiled(self, spec: GrammarSpec) -> None:
        """Without compiling: GrammarError when ``spec`` cannot be served (a repetition past the
        bound, or a compile that failed before); GrammarPending when it must be compiled first."""
        ...

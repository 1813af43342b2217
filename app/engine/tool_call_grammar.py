"""A forced tool call on gpt-oss: its output is an analysis, then one call to an allowed function
whose arguments follow that function's schema, whatever the model would rather say.

xgrammar reads Harmony's special tokens as their text, so a grammar over the whole output would
let a model spell ``<|channel|>`` in plain tokens (which then does not parse as Harmony). The
structure is therefore fixed here by token id, as openai-harmony encodes it; xgrammar constrains
the arguments only:

1. ``<|channel|>analysis<|message|>``, forced;
2. the analysis: free text (no special token but ``<|end|>``) until the model ends it or it has
   ``budget`` tokens, when ``<|end|>`` is forced;
3. ``<|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>``
   (``to=NAMESPACE.NAME`` for a namespace of the request's own), token by token from a trie of
   the allowed names' headers (the model picks among the names);
4. the arguments under that tool's JSON-schema matcher (no special token in them), whose one
   stop token is ``<|call|>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import xgrammar as xgr

from app.prompts.builder import recipient
from app.prompts.harmony_encoding import harmony_encoding

ANALYSIS_OPEN = "<|channel|>analysis<|message|>"
Phase = Literal["open", "analysis", "header", "arguments"]


def call_header(name: str) -> str:
    """``name``: the function's qualified name (app.prompts.builder's ToolSpec)."""
    return f"<|start|>assistant<|channel|>commentary to={recipient(name)} <|constrain|>json<|message|>"


@dataclass(frozen=True, slots=True)
class CallPlan:
    """The token ids of a forced call's fixed parts, for one set of allowed tools."""

    opening: tuple[int, ...]
    headers: tuple[tuple[tuple[int, ...], str], ...]  # (header ids, the tool's schema) per tool
    message_end: int  # <|end|>
    call: int  # <|call|>
    specials: torch.Tensor  # every special token id but <|end|> and <|call|>


def call_plan(tools: Sequence[tuple[str, str]], message_end: int, call: int, special_ids: Iterable[int]) -> CallPlan:
    """``tools``: (name, parameters schema as JSON text) of the functions the call may pick."""
    encoding = harmony_encoding()

    def ids(text: str) -> tuple[int, ...]:
        return tuple(encoding.encode(text, allowed_special="all"))

    others = sorted(set(special_ids) - {message_end, call})
    headers = tuple((ids(call_header(name)), schema) for name, schema in tools)
    return CallPlan(ids(ANALYSIS_OPEN), headers, message_end, call, torch.tensor(others, dtype=torch.long))


class ToolCallGrammar:
    """One sequence's forced call (see the module's docstring). ``arguments`` makes the matcher
    for a tool's schema (from the compiled grammars' cache)."""

    active = True  # constrained from the first token: the runner need not hold its stop tokens back

    def __init__(self, plan: CallPlan, arguments: Callable[[str], xgr.GrammarMatcher], budget: int) -> None:
        self._plan = plan
        self._arguments = arguments
        self._budget = budget
        self.phase: Phase = "open"
        self._consumed: list[int] = []  # tokens of the phase so far (opening, header)
        self.analysis_tokens = 0
        self.matcher: xgr.GrammarMatcher | None = None

    @property
    def constrains(self) -> bool:
        """xgrammar masks this step (the arguments); restrict() does the rest."""
        return self.phase == "arguments" and self.matcher is not None and not self.matcher.is_terminated()

    def _next_fixed(self) -> set[int]:
        at = len(self._consumed)
        if self.phase == "open":
            return {self._plan.opening[at]}
        return {
            header[at] for header, _ in self._plan.headers if len(header) > at and list(header[:at]) == self._consumed
        }

    def restrict(self, row: torch.Tensor) -> None:
        """Mask one row of logits in place for this step."""
        if self.phase in ("open", "header"):
            _keep_only(row, self._next_fixed())
        elif self.phase == "analysis" and self.analysis_tokens >= self._budget:
            _keep_only(row, {self._plan.message_end})  # the budget is spent: the analysis ends here
        else:
            row[self._plan.specials.to(row.device)] = float("-inf")
            # <|call|> ends the arguments only (the matcher allows it once they are whole JSON).
            row[self._plan.call if self.phase == "analysis" else self._plan.message_end] = float("-inf")

    def accept(self, token: int) -> bool:
        """Follow the chosen token; False if it breaks the structure (the row then fails)."""
        if self.phase in ("open", "header"):
            if token not in self._next_fixed():
                return False
            self._consumed.append(token)
            if self.phase == "open" and len(self._consumed) == len(self._plan.opening):
                self.phase, self._consumed = "analysis", []
            elif self.phase == "header":
                done = [schema for header, schema in self._plan.headers if list(header) == self._consumed]
                if done:
                    self.phase, self.matcher = "arguments", self._arguments(done[0])
            return True
        if self.phase == "analysis":
            if token == self._plan.message_end:
                self.phase = "header"
            elif token == self._plan.call:
                return False
            else:
                self.analysis_tokens += 1
            return True
        assert self.matcher is not None
        return bool(self.matcher.accept_token(token))


def _keep_only(row: torch.Tensor, allowed: set[int]) -> None:
    ids = torch.tensor(sorted(allowed), dtype=torch.long, device=row.device)
    kept = row[ids].clone()
    row.fill_(float("-inf"))
    # Their own logits, so that the model chooses among them (a header's names); never -inf.
    row[ids] = torch.nan_to_num(kept, neginf=-1e4)

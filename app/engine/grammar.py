"""Constrained decoding on xgrammar: compiled grammars (cached), and one matcher per sequence.

xgrammar is the engine vLLM and SGLang use by default: JSON Schema, regex and EBNF compile to a
token-level automaton for one tokenizer, and a step masks every constrained row at once (a
batched bitmask fill in C++ threads, one in-place kernel over the logits). A request without a
grammar is not touched. Compiling runs in worker processes of its own, bounded in time
(app.engine.grammar_workers); the prompt thread only asks whether a grammar is compiled
(``check_compiled``), and the HTTP layer has it compiled (``check``) outside that thread; the
runner's ``matcher`` finds the compiled grammar in the cache.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import xgrammar as xgr

from app.contract.grammar import GrammarError, GrammarPending, GrammarSpec, GrammarUnavailable
from app.engine.grammar_workers import CompileFailed, CompileTimedOut, CompileWorkers, WorkerUnavailable
from app.engine.tool_call_grammar import ToolCallGrammar, call_plan
from app.text.repetitions import grammar_repetition_error

COMPILED_GRAMMARS = 64  # the cache's bound: compiled grammars are kept per spec, least recent out
REFUSED_GRAMMARS = 256  # grammars that did not compile, by reason: a repeat is refused at once
COMPILE_WORKERS = 2  # processes: one slow compile leaves the other for everyone else
DEFAULT_COMPILE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class HarmonyMarkers:
    """The token ids that open gpt-oss's final channel (``<|channel|>final<|message|>``) and the
    one that ends its answer (``<|return|>``)."""

    channel: int
    message: int
    final: tuple[int, ...]
    end: int
    message_end: int = -1  # <|end|>: closes a message (the analysis, before a forced call)
    call: int = -1  # <|call|>: ends a tool call


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer, thread-safe, with bounded caches of the compiled
    and of the refused.

    Implements app.contract.grammar.GrammarService for the HTTP layer; the runner asks it for
    matchers. The tokenizer's vocabulary is read on first compile (a second or so for gpt-oss's).
    Two requests for one grammar compile it once; a compile past ``compile_timeout`` seconds is
    killed with its worker and refused.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        harmony: HarmonyMarkers | None = None,
        capacity: int = COMPILED_GRAMMARS,
        compile_timeout: float = DEFAULT_COMPILE_TIMEOUT,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(set(stop_token_ids))
        self.harmony = harmony
        self._capacity = capacity
        self._info: xgr.TokenizerInfo | None = None
        self._compiled: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._refused: OrderedDict[GrammarSpec, str] = OrderedDict()
        self._compiling: dict[GrammarSpec, threading.Event] = {}
        self._lock = threading.Lock()
        self._info_lock = threading.Lock()
        self.workers = CompileWorkers(self._info_json, COMPILE_WORKERS, compile_timeout)
        self.compilations = 0  # grammars compiled (not found in the cache): what the tests count
        self._special_ids: frozenset[int] | None = None

    def _tokenizer_info(self) -> xgr.TokenizerInfo:
        with self._info_lock:
            if self._info is None:
                self._info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
                )
            return self._info

    def _info_json(self) -> str:
        return str(self._tokenizer_info().serialize_json())

    def check(self, spec: GrammarSpec) -> None:
        self.compiled(spec)

    def check_compiled(self, spec: GrammarSpec) -> None:
        for key in _parts(spec):
            if (reason := grammar_repetition_error(key.kind, key.source)) is not None:
                raise GrammarError(reason)
            with self._lock:
                if key in self._compiled:
                    continue
                if (refused := self._refused.get(key)) is not None:
                    raise GrammarError(refused)
            raise GrammarPending(functools.partial(self.check, spec))

    def compiled(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        parts = [self._compiled_one(key) for key in _parts(spec)]
        return parts[0]  # a tool call's first tool: the runner asks for each one's itself

    def _compiled_one(self, key: GrammarSpec) -> xgr.CompiledGrammar:
        if (reason := grammar_repetition_error(key.kind, key.source)) is not None:
            raise GrammarError(reason)
        while True:
            with self._lock:
                found = self._compiled.get(key)
                if found is not None:
                    self._compiled.move_to_end(key)
                    return found
                if (refused := self._refused.get(key)) is not None:
                    raise GrammarError(refused)
                underway = self._compiling.get(key)
                if underway is None:
                    self._compiling[key] = threading.Event()
                    break
            underway.wait()  # another request compiles this one: its outcome lands in a cache
        try:
            grammar = self._compile(key)
        except GrammarUnavailable:
            raise
        except GrammarError as error:
            with self._lock:
                self._refused[key] = str(error)
                while len(self._refused) > REFUSED_GRAMMARS:
                    self._refused.popitem(last=False)
            raise
        else:
            with self._lock:
                self.compilations += 1
                self._compiled[key] = grammar
                while len(self._compiled) > self._capacity:
                    self._compiled.popitem(last=False)
            return grammar
        finally:
            with self._lock:
                self._compiling.pop(key).set()

    def _compile(self, key: GrammarSpec) -> xgr.CompiledGrammar:
        try:
            serialized = self.workers.compile(key.kind, key.source)
        except CompileTimedOut:
            raise GrammarError(f"{_what(key)} took more than {self.workers.timeout:g} s to compile") from None
        except CompileFailed as failure:
            raise GrammarError(f"{_what(key)} cannot be used: {failure.reason}") from None
        except WorkerUnavailable as error:
            raise GrammarUnavailable(str(error)) from error
        return xgr.CompiledGrammar.deserialize_json(serialized, self._tokenizer_info())

    def sequence_grammar(self, spec: GrammarSpec) -> SequenceGrammar | ToolCallGrammar:
        """What constrains one sequence: a forced tool call's structure, or a matcher."""
        if spec.kind == "tool_call":
            if self.harmony is None or self.harmony.call < 0:
                raise GrammarError("a forced tool call needs a Harmony model (gpt-oss)")
            call = self.harmony.call
            tools = [(name, json.dumps(schema, sort_keys=True)) for name, schema in json.loads(spec.source)]

            def arguments(schema: str) -> xgr.GrammarMatcher:
                # The call ends with <|call|>, which the matcher allows once the JSON is whole.
                compiled = self.compiled(GrammarSpec("json_schema", schema))
                return xgr.GrammarMatcher(compiled, override_stop_tokens=[call])

            plan = call_plan(tools, self.harmony.message_end, call, self.special_ids())
            return ToolCallGrammar(plan, arguments, spec.reasoning_budget)
        return self.matcher(spec)

    def matcher(self, spec: GrammarSpec) -> SequenceGrammar:
        markers = self.harmony if spec.final_channel_only else None
        compiled = self.compiled(spec)
        if markers is None:
            return SequenceGrammar(xgr.GrammarMatcher(compiled))
        # A Harmony answer ends with <|return|> (not <|call|>: a tool call is not an answer).
        return SequenceGrammar(xgr.GrammarMatcher(compiled, override_stop_tokens=[markers.end]), markers)

    def special_ids(self) -> frozenset[int]:
        """The tokenizer's added tokens (gpt-oss: Harmony's <|...|> markers)."""
        if self._special_ids is None:
            self._special_ids = frozenset(int(i) for i in self._tokenizer.get_added_vocab().values())
        return self._special_ids


def _what(spec: GrammarSpec) -> str:
    return {
        "json_schema": "the JSON schema",
        "regex": "the regex",
        "choice": "the choices",
        "json_object": "the JSON grammar",
        "tool_call": "the tools' parameters",
    }[spec.kind]


def _parts(spec: GrammarSpec) -> list[GrammarSpec]:
    """What compiles for ``spec``: a forced tool call's is each tool's arguments schema (see
    tool_call_grammar); where a grammar applies does not change it."""
    if spec.kind != "tool_call":
        return [GrammarSpec(spec.kind, spec.source)]
    parts = [GrammarSpec("json_schema", json.dumps(schema, sort_keys=True)) for _, schema in json.loads(spec.source)]
    if not parts:
        raise GrammarError("a forced tool call needs a tool")
    return parts


@dataclass(slots=True)
class SequenceGrammar:
    """One sequence's matcher. With Harmony markers it waits for the final channel to open (the
    analysis runs free) and constrains only the answer; until then the sequence may not end."""

    matcher: xgr.GrammarMatcher
    markers: HarmonyMarkers | None = None
    active: bool = field(init=False)
    _header: list[int] | None = field(init=False, default=None)  # tokens since <|channel|>

    def __post_init__(self) -> None:
        self.active = self.markers is None

    @property
    def constrains(self) -> bool:
        """This step's token is masked by the grammar."""
        return self.active and not self.matcher.is_terminated()

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the grammar rejects it (the row then fails)."""
        if self.active:
            return bool(self.matcher.accept_token(token))
        markers = self.markers
        assert markers is not None
        if token == markers.channel:
            self._header = []
        elif token == markers.message and self._header is not None:
            self.active = tuple(self._header[: len(markers.final)]) == markers.final
            self._header = None
        elif self._header is not None:
            self._header.append(token)
        return True


class GrammarMasks:
    """The runner's bitmask buffer: every constrained row of a step filled at once, then applied
    to the logits in place by xgrammar's kernel for their device."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self._device = device
        self._bitmask = xgr.allocate_token_bitmask(rows, vocab_size)
        self._batch = xgr.BatchGrammarMatcher(max_threads=2)

    @property
    def nbytes(self) -> int:
        return int(self._bitmask.numel() * self._bitmask.element_size())

    def apply(self, logits: torch.Tensor, grammars: Sequence[SequenceGrammar | ToolCallGrammar | None]) -> None:
        """Mask ``logits`` [rows, vocab] in place for the rows whose grammar constrains now."""
        self._fill(logits, grammars)
        for i, g in enumerate(grammars):
            if isinstance(g, ToolCallGrammar):
                g.restrict(logits[i])  # a forced call's structure, after its arguments' grammar

    def _fill(self, logits: torch.Tensor, grammars: Sequence[SequenceGrammar | ToolCallGrammar | None]) -> None:
        rows = [i for i, g in enumerate(grammars) if g is not None and g.constrains]
        if not rows:
            return
        if len(grammars) > self._bitmask.shape[0]:
            self._bitmask = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        matchers = [m for i in rows if (m := grammars[i].matcher) is not None]  # type: ignore[union-attr]
        self._batch.batch_fill_next_token_bitmask(matchers, self._bitmask, indices=rows)
        bitmask = self._bitmask if logits.device.type == "cpu" else self._bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)

"""The step contract: what the scheduler asks of a model runner, and what a step gives back.

Torch-free on purpose: the scheduler (actors/) imports this and nothing of app.engine, which
implements it (``ModelRunner``, ``StaticModelRunner``; a fake in the actor tests). A runner owns
the tensors (KV cache, the last token, each request's random generator) and says, after each call,
where each of its sequences stands (``RowOutput.num_computed``); the scheduler decides what every
step does from those reports alone and counts nothing of its own, so nothing is tracked on both
sides.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from app.contract.failures import FailureCode
from app.contract.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    seq_id: str
    tokens: int  # at most this many of the sequence's prompt tokens not computed yet (the runner takes what is left)


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One model step: a token for each sequence of ``decode`` (its prompt is in) and a chunk of
    each prompt in ``chunks`` (admission order), in one forward. No phase is kept anywhere: which
    kind of step this is follows from what it holds."""

    decode: tuple[str, ...] = ()
    chunks: tuple[PrefillChunk, ...] = ()

    @property
    def seq_ids(self) -> tuple[str, ...]:
        return (*self.decode, *(chunk.seq_id for chunk in self.chunks))

    @property
    def kind(self) -> str:
        """A StepResult's kind: "prefill" (chunks only), "decode" (rows only) or "mixed" (both)."""
        if self.chunks:
            return "mixed" if self.decode else "prefill"
        return "decode"


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A chosen token's log-probability and the likeliest alternatives, from the model's raw
    logits (before temperature, penalties, logit_bias and any grammar, as vLLM's default)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), likeliest first


@dataclass(frozen=True, slots=True)
class RowOutput:
    """Where a step left one sequence: the only thing that moves its progress.

    ``num_computed`` counts the tokens whose keys its row holds (prompt, then generated), as vLLM's
    ``num_computed_tokens``: its prompt is in once that reaches the prompt's length. ``tokens`` are
    the tokens it got, in order: none from a chunk that leaves some of its prompt, one from a
    decode or from the chunk that ends its prompt; a step that verifies drafted tokens would give
    the accepted ones and the next (and move ``num_computed`` by as many)."""

    num_computed: int
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token, for a sequence that asked; else none


@dataclass(frozen=True, slots=True)
class StepResult:
    rows: dict[str, RowOutput]  # seq_id -> where the step left it (every sequence it ran that did not fail)
    kind: str  # "prefill" | "decode" | "mixed" (decode rows and prompt chunks in one forward) | "idle"
    batch: int
    new_tokens: int  # tokens that went through the model
    seconds: float
    failed: dict[str, FailureCode] = field(default_factory=dict)  # seq_id -> why it alone got no token
    # Prompt tokens among new_tokens; None: all of a prefill's, none of a decode's.
    prompt_tokens: int | None = None

    @property
    def prefilled(self) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return self.new_tokens if self.kind == "prefill" else 0

    @property
    def produced(self) -> int:
        """Tokens the step chose, every row's."""
        return sum(len(row.tokens) for row in self.rows.values())


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """The prefix KV cache's counters (cumulative) and its size now."""

    lookups: int = 0  # sequences that looked for a cached prefix of their prompt
    hits: int = 0  # of which found one
    hit_tokens: int = 0  # prompt tokens they did not prefill
    bytes: int = 0
    blocks: int = 0
    evictions: int = 0  # blocks evicted to make room


class StepOutOfMemory(RuntimeError):
    """The accelerator ran out of memory in a step: the scheduler retries it once, split in two."""


class StepBackend(Protocol):
    """A model runner, as the scheduler drives it: one call at a time, from one worker thread.

    ``must_continue`` names the sequences that may not end this step (they are below their
    min_tokens): the runner masks their stop tokens. Which ones, the scheduler decides.

    ``add`` with ``fork_from`` (a sequence in the runner whose prompt, the same, is prefilled):
    the new sequence starts with a copy of that one's keys for all but the last prompt token, so
    its prefill is that one token (its own logits, its own first token). Without it, a runner with
    a prefix cache may start the sequence from the longest cached prefix of its prompt. ``add``
    returns the prompt tokens the sequence starts with (its ``num_computed``): its prefill is the
    rest (the scheduler's plan for this trip may offer more; the runner takes what is left). A
    fork always starts with all but its last prompt token, so the scheduler plans it that way.
    """

    def add(
        self,
        seq_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Iterable[int] | None,
        fork_from: str | None = None,
    ) -> int: ...

    def release(self, seq_id: str) -> None:
        """Free a sequence's row (idempotent); what its row holds may stay in the prefix cache."""
        ...

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counters; None without one."""
        ...

    def step(self, plan: StepPlan, must_continue: Collection[str] = ()) -> StepResult:
        """Run the plan's one forward (kind "idle" when it holds nothing)."""
        ...

    def split(self, seq_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Two halves of a decode batch that each need less memory than the whole."""
        ...

    def free_cached_memory(self) -> None:
        """Give cached accelerator memory back before a retry (after an out-of-memory step)."""
        ...

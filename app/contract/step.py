"""The step contract: what the scheduler asks of a model runner, and what a step gives back.

Torch-free on purpose: the scheduler (actors/) imports this and nothing of app.engine, which
implements it (``ModelRunner``, ``StaticModelRunner``; a fake in the actor tests). A runner owns
the tensors (KV cache, the last token, each request's random generator); the scheduler owns each
request's progress and decides what every step does, so nothing is tracked on both sides.
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
    tokens: int  # how many of the sequence's pending prompt tokens to prefill now


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A chosen token's log-probability and the likeliest alternatives, from the model's raw
    logits (before temperature, penalties, logit_bias and any grammar, as vLLM's default)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), likeliest first


@dataclass(frozen=True, slots=True)
class StepResult:
    tokens: dict[str, int]  # seq_id -> the token chosen this step (prefills that finished, decodes)
    kind: str  # "prefill" | "decode" | "mixed" (decode rows and prompt chunks in one forward) | "idle"
    batch: int
    new_tokens: int  # tokens that went through the model
    seconds: float
    failed: dict[str, FailureCode] = field(default_factory=dict)  # seq_id -> why it alone got no token
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # for the sequences that asked
    # Prompt tokens among new_tokens; None: all of a prefill's, none of a decode's.
    prompt_tokens: int | None = None

    @property
    def prefilled(self) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return self.new_tokens if self.kind == "prefill" else 0


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
    returns the prompt tokens the sequence starts with: its prefill is the rest (the scheduler's
    plan for this trip may offer more; the runner takes what is left).
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

    def prefill(self, chunks: Sequence[PrefillChunk], must_continue: Collection[str] = ()) -> StepResult: ...

    def decode(self, seq_ids: Sequence[str], must_continue: Collection[str] = ()) -> StepResult: ...

    def mixed(
        self, seq_ids: Sequence[str], chunks: Sequence[PrefillChunk], must_continue: Collection[str] = ()
    ) -> StepResult:
        """One step that decodes ``seq_ids`` and prefills ``chunks`` together (kind "mixed")."""
        ...

    def split(self, seq_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Two halves of a decode batch that each need less memory than the whole."""
        ...

    def free_cached_memory(self) -> None:
        """Give cached accelerator memory back before a retry (after an out-of-memory step)."""
        ...

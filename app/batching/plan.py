"""What the next model step does.

Each step is one of: a packed prefill of prompt chunks, one decode token for every sequence whose
prompt is in, or both in one forward (a mixed step, chunked prefill as vLLM does it).

With a ``step_token_budget`` (the profile's), a prompt that arrives while others decode is
prefilled in mixed steps: every decoding row and, in what is left of the budget, chunks of the
waiting prompts, so the running streams keep getting a token every step. A step mixes only when
a prompt is waiting: a decode-only step over the cache's rows is cheaper than the packed forward.

Without a budget (0), or when the decoding rows alone fill it, prefill and decode steps alternate:
new prompts go first (time to first token), but after ``max_consecutive_prefills`` prefill steps
the decoders get a step, so a stream of arrivals cannot starve the sequences already running.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.config import Profile
from app.contract.step import PrefillChunk, StepBackend, StepResult


@dataclass(frozen=True, slots=True)
class SequenceView:
    """What the plan needs to know of one running sequence."""

    seq_id: str
    prompt_remaining: int  # prompt tokens not yet prefilled


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    chunks: tuple[tuple[str, int], ...]  # (seq_id, tokens to prefill now), in admission order

    @property
    def seq_ids(self) -> tuple[str, ...]:
        return tuple(seq_id for seq_id, _ in self.chunks)


@dataclass(frozen=True, slots=True)
class DecodePlan:
    seq_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MixedPlan:
    """One forward that decodes ``decode`` and prefills ``chunks`` (within the step's budget)."""

    decode: tuple[str, ...]
    chunks: tuple[tuple[str, int], ...]

    @property
    def seq_ids(self) -> tuple[str, ...]:
        return (*self.decode, *(seq_id for seq_id, _ in self.chunks))


StepPlan = PrefillPlan | DecodePlan | MixedPlan


def plan_kind(plan: StepPlan) -> str:
    """The kind of step a plan runs as (a StepResult's ``kind``)."""
    return "mixed" if isinstance(plan, MixedPlan) else "prefill" if isinstance(plan, PrefillPlan) else "decode"


def admit_count(waiting: int, running: int, profile: Profile) -> int:
    """How many waiting requests join the batch now (FIFO): as many as there are free rows."""
    return max(0, min(waiting, profile.max_batch_size - running))


def plan_step(
    running: Sequence[SequenceView],
    consecutive_prefills: int,
    profile: Profile,
    prompt_room: Callable[[int], int] = lambda room: room,
) -> StepPlan | None:
    """``prompt_room``: of the prompt tokens the budget leaves a mixed step, how many it carries
    (the batch's StepPace keeps the step within the profile's mixed_step_slowdown). It applies
    while fewer prompts wait than rows decode: it protects the running streams' latency, and when
    most of the batch is still waiting for its first token, getting those prompts in comes first
    (or a burst of arrivals that missed the first prefill would trickle in 16 tokens a step)."""
    prefilling = [seq for seq in running if seq.prompt_remaining > 0]
    decoding = tuple(seq.seq_id for seq in running if seq.prompt_remaining == 0)
    room = profile.step_token_budget - len(decoding)  # prompt tokens a mixed step may carry
    if prefilling and decoding and profile.step_token_budget and room > 0:
        carried = prompt_room(room) if len(prefilling) < len(decoding) else room
        return MixedPlan(decoding, _chunks(prefilling, carried))
    if prefilling and (not decoding or consecutive_prefills < profile.max_consecutive_prefills):
        return PrefillPlan(_chunks(prefilling, profile.prefill_chunk_tokens))
    if decoding:
        return DecodePlan(decoding)
    return None


def _chunks(prefilling: Sequence[SequenceView], budget: int) -> tuple[tuple[str, int], ...]:
    """Prompt chunks in admission order, ``budget`` tokens in all."""
    chunks: list[tuple[str, int]] = []
    for seq in prefilling:
        if budget <= 0:
            break
        take = min(seq.prompt_remaining, budget)
        chunks.append((seq.seq_id, take))
        budget -= take
    return tuple(chunks)


def halves(plan: StepPlan, split_rows: Callable[[Sequence[str]], tuple[list[str], list[str]]]) -> list[StepPlan]:
    """The two smaller steps an out-of-memory step is retried as (empty ones left out).

    A prefill splits its chunks in admission order; a decode splits as the runner says, so that
    each half really spans fewer rows of its cache; a mixed step becomes its decode and its
    prefill, each a step of its own.
    """
    if isinstance(plan, MixedPlan):
        parts: list[StepPlan] = [DecodePlan(plan.decode), PrefillPlan(plan.chunks)]
    elif isinstance(plan, PrefillPlan):
        middle = len(plan.chunks) // 2
        parts = [PrefillPlan(plan.chunks[:middle]), PrefillPlan(plan.chunks[middle:])]
    else:
        first, second = split_rows(plan.seq_ids)
        parts = [DecodePlan(tuple(first)), DecodePlan(tuple(second))]
    return [part for part in parts if part.seq_ids]


def run_plan(backend: StepBackend, plan: StepPlan, must_continue: frozenset[str]) -> StepResult:
    """The step a plan says, on a runner (the scheduler's worker thread, and the bare step loops
    of tools/ that measure against it)."""
    if isinstance(plan, PrefillPlan):
        return backend.prefill([PrefillChunk(seq_id, n) for seq_id, n in plan.chunks], must_continue)
    if isinstance(plan, MixedPlan):
        chunks = [PrefillChunk(seq_id, n) for seq_id, n in plan.chunks]
        return backend.mixed(list(plan.decode), chunks, must_continue)
    return backend.decode(list(plan.seq_ids), must_continue)

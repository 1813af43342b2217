"""What the next model step does.

Each step is a ``StepPlan``: chunks of the prompts not computed yet, one decode token for every
sequence whose prompt is in, or both in one forward (a mixed step, chunked prefill as vLLM does it).

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
from app.contract.step import PrefillChunk, StepPlan


@dataclass(frozen=True, slots=True)
class SequenceView:
    """What the plan needs to know of one running sequence."""

    seq_id: str
    prompt_left: int  # prompt tokens not computed yet (0: it decodes)


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
    prefilling = [seq for seq in running if seq.prompt_left > 0]
    decoding = tuple(seq.seq_id for seq in running if seq.prompt_left == 0)
    room = profile.step_token_budget - len(decoding)  # prompt tokens a mixed step may carry
    if prefilling and decoding and profile.step_token_budget and room > 0:
        carried = prompt_room(room) if len(prefilling) < len(decoding) else room
        return StepPlan(decoding, _chunks(prefilling, carried))
    if prefilling and (not decoding or consecutive_prefills < profile.max_consecutive_prefills):
        return StepPlan(chunks=_chunks(prefilling, profile.prefill_chunk_tokens))
    if decoding:
        return StepPlan(decoding)
    return None


def _chunks(prefilling: Sequence[SequenceView], budget: int) -> tuple[PrefillChunk, ...]:
    """Prompt chunks in admission order, ``budget`` tokens in all."""
    chunks: list[PrefillChunk] = []
    for seq in prefilling:
        if budget <= 0:
            break
        take = min(seq.prompt_left, budget)
        chunks.append(PrefillChunk(seq.seq_id, take))
        budget -= take
    return tuple(chunks)


def apart(plan: StepPlan) -> list[StepPlan]:
    """A mixed step as its decode and its prefill, each a step of its own."""
    return [StepPlan(plan.decode), StepPlan(chunks=plan.chunks)]


def halves(plan: StepPlan, split_rows: Callable[[Sequence[str]], tuple[list[str], list[str]]]) -> list[StepPlan]:
    """The two smaller steps an out-of-memory step is retried as (empty ones left out).

    A mixed step becomes its decode and its prefill; a prefill splits its chunks in admission
    order; a decode splits as the runner says, so that each half really spans fewer rows of its
    cache.
    """
    if plan.decode and plan.chunks:
        parts = apart(plan)
    elif plan.chunks:
        middle = len(plan.chunks) // 2
        parts = [StepPlan(chunks=plan.chunks[:middle]), StepPlan(chunks=plan.chunks[middle:])]
    else:
        first, second = split_rows(plan.decode)
        parts = [StepPlan(tuple(first)), StepPlan(tuple(second))]
    return [part for part in parts if part.seq_ids]

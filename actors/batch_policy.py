"""What the next model step does: pure batching policy, no trio, no torch.

Each step is one of: a packed prefill of prompt chunks, or one decode token for every sequence
whose prompt is in. New prompts go first (time to first token), but after
``max_consecutive_prefills`` prefill steps the decoders get a step, so a stream of arrivals cannot
starve the sequences already running.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchSettings:
    max_batch_size: int
    prefill_chunk_tokens: int  # most prompt tokens one prefill step takes, all sequences together
    max_consecutive_prefills: int


@dataclass(frozen=True, slots=True)
class SequenceView:
    """What the policy needs to know of one running sequence."""

    seq_id: str
    prompt_remaining: int  # prompt tokens not yet prefilled


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    chunks: tuple[tuple[str, int], ...]  # (seq_id, tokens to prefill now), in admission order


@dataclass(frozen=True, slots=True)
class DecodePlan:
    seq_ids: tuple[str, ...]


StepPlan = PrefillPlan | DecodePlan | None


def admit_count(waiting: int, running: int, settings: BatchSettings) -> int:
    """How many waiting requests join the batch now (FIFO): as many as there are free rows."""
    return max(0, min(waiting, settings.max_batch_size - running))


def plan_step(running: Sequence[SequenceView], consecutive_prefills: int, settings: BatchSettings) -> StepPlan:
    prefilling = [seq for seq in running if seq.prompt_remaining > 0]
    decoding = tuple(seq.seq_id for seq in running if seq.prompt_remaining == 0)
    if prefilling and (not decoding or consecutive_prefills < settings.max_consecutive_prefills):
        budget = settings.prefill_chunk_tokens
        chunks: list[tuple[str, int]] = []
        for seq in prefilling:
            if budget <= 0:
                break
            take = min(seq.prompt_remaining, budget)
            chunks.append((seq.seq_id, take))
            budget -= take
        return PrefillPlan(tuple(chunks))
    if decoding:
        return DecodePlan(decoding)
    return None

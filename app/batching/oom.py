"""Out of memory in a step: run it again as two halves; a half that still does not fit fails."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from app.batching.plan import StepPlan, halves, plan_kind
from app.contract.failures import FailureCode
from app.contract.step import StepOutOfMemory, StepResult


def retry_in_halves(
    plan: StepPlan,
    run: Callable[[StepPlan], StepResult],
    split_rows: Callable[[Sequence[str]], tuple[list[str], list[str]]],
) -> StepResult:
    """One result for the whole plan, from its halves (``run`` is the step itself, ``split_rows``
    the runner's split of a decode). A lone sequence that did not fit fails at once."""
    kind = plan_kind(plan)
    ids = plan.seq_ids
    if len(ids) < 2:
        return StepResult({}, kind, 0, 0, 0.0, dict.fromkeys(ids, "out_of_memory"))
    tokens: dict[str, int] = {}
    failed: dict[str, FailureCode] = {}
    seconds, new_tokens, prompt_tokens = 0.0, 0, 0
    for half in halves(plan, split_rows):
        try:
            result = run(half)
        except StepOutOfMemory:
            failed.update(dict.fromkeys(half.seq_ids, "out_of_memory"))
            continue
        tokens.update(result.tokens)
        failed.update(result.failed)
        seconds += result.seconds
        new_tokens += result.new_tokens
        prompt_tokens += result.prefilled
    return StepResult(tokens, kind, len(ids) - len(failed), new_tokens, seconds, failed, prompt_tokens=prompt_tokens)

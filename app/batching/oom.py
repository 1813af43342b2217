"""A step that fails as a whole, run again in parts so that what failed fails alone: out of
memory, as two halves (a half that still does not fit fails); a mixed step that raised, as its
decode and its prefill (a prompt whose forward raises must not take the running streams down)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from app.batching.plan import apart, halves
from app.contract.failures import FailureCode
from app.contract.step import RowOutput, StepOutOfMemory, StepPlan, StepResult


def retry_in_halves(
    plan: StepPlan,
    run: Callable[[StepPlan], StepResult],
    split_rows: Callable[[Sequence[str]], tuple[list[str], list[str]]],
) -> StepResult:
    """One result for the whole plan, from its halves (``run`` is the step itself, ``split_rows``
    the runner's split of a decode). A lone sequence that did not fit fails at once."""
    ids = plan.seq_ids
    if len(ids) < 2:
        return StepResult({}, plan.kind, 0, 0, 0.0, dict.fromkeys(ids, "out_of_memory"))
    return _run_apart(plan, halves(plan, split_rows), run, StepOutOfMemory, "out_of_memory")


def retry_mixed_apart(plan: StepPlan, run: Callable[[StepPlan], StepResult]) -> StepResult:
    """A mixed step raised: its decode and its prefill, each a step of its own; the sequences of
    a part that raises again fail (``step_failed``), the others go on. Nothing of the failed
    forward stays: a sequence's num_computed moves only after a forward that returned, and the keys it
    wrote are written again at the same positions."""
    # The scheduler logged the mixed step's error; a part that raises again fails its requests.
    return _run_apart(plan, apart(plan), run, Exception, "step_failed")


def _run_apart(
    plan: StepPlan,
    parts: Sequence[StepPlan],
    run: Callable[[StepPlan], StepResult],
    raised: type[Exception],
    code: FailureCode,
) -> StepResult:
    """One result for ``plan`` from its parts, each run on its own: a part that raises ``raised``
    fails its sequences with ``code``, the others keep what their part gave."""
    rows: dict[str, RowOutput] = {}
    failed: dict[str, FailureCode] = {}
    seconds, new_tokens, prompt_tokens = 0.0, 0, 0
    for part in parts:
        try:
            result = run(part)
        except raised:
            failed.update(dict.fromkeys(part.seq_ids, code))
            continue
        rows.update(result.rows)
        failed.update(result.failed)
        seconds += result.seconds
        new_tokens += result.new_tokens
        prompt_tokens += result.prefilled
    batch = len(plan.seq_ids) - len(failed)
    return StepResult(rows, plan.kind, batch, new_tokens, seconds, failed, prompt_tokens=prompt_tokens)

"""One trip of the scheduler to the model, in the worker thread: free rows, add the joiners, run
at most one step, and bring back what the runner said.

Plain and synchronous (no trio, no batch): it touches the runner only, and the scheduler applies
what comes back to its batch in the event loop once the trip is over. The bare step loops of
tools/ run the same trips.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import structlog

from app.batching.batch import Work
from app.batching.oom import retry_in_halves, retry_mixed_apart
from app.contract.step import PrefixCacheStats, StepBackend, StepOutOfMemory, StepPlan, StepResult

log = structlog.get_logger("scheduler")


@dataclass(frozen=True, slots=True)
class TripOutcome:
    started: dict[str, int]  # joiner -> prompt tokens its row starts with (its num_computed: prefix cache, fork)
    prefix_stats: PrefixCacheStats | None  # after the joins and releases (None: neither, or no prefix cache)
    result: StepResult | None  # None: the trip ran no step


def run_trip(backend: StepBackend, work: Work[Any]) -> TripOutcome:
    """Releases first (one that fails must not keep the others' rows), then the joiners, then the
    step. A step that raises, other than what ``run_step`` retries, ends the trip with it."""
    for seq_id in work.releases:
        try:
            backend.release(seq_id)
        except Exception:  # the other releases must still happen, or their rows leak
            log.exception("release_failed", request_id=seq_id)
    started = {
        r.request_id: backend.add(r.request_id, r.prompt, r.params, r.stop_token_ids, fork_from=r.fork_from)
        for r in work.joins
    }
    prefix_stats = backend.prefix_cache_stats() if work.joins or work.releases else None
    result = None if work.plan is None else run_step(backend, work.plan, work.must_continue)
    return TripOutcome(started, prefix_stats, result)


def run_step(backend: StepBackend, plan: StepPlan, must_continue: frozenset[str]) -> StepResult:
    """The plan's step; out of memory, again in halves; a mixed step that raised, again as its
    decode and its prefill (a prompt's chunk rode along with the running streams: its fault is its
    own)."""
    run = functools.partial(backend.step, must_continue=must_continue)
    try:
        return run(plan)
    except StepOutOfMemory:
        log.warning("step_out_of_memory", kind=plan.kind, sequences=len(plan.seq_ids))
        backend.free_cached_memory()
        return retry_in_halves(plan, run, backend.split)
    except Exception as error:
        if plan.kind != "mixed":
            raise
        log.error("mixed_step_failed", error=repr(error), requests=list(plan.seq_ids))
        return retry_mixed_apart(plan, run)

"""The batch policy on its own: plain function calls, no trio, no threads, no model.

Breakage each group catches: admission that ignores the free rows or the bound; an arrival window
for a busy batch; a stop token honoured below min_tokens or under ignore_eos; a length limit off by
one; a prefill plan over its token budget, or one that starves the decoders; an abort of a running
request reported before its row is freed, or with the wrong step count; tokens delivered for a
request aborted during the step; an out-of-memory split that loses or repeats a sequence.
"""

from __future__ import annotations

import dataclasses

import pytest

from app.batching.admission import DrainRate, arrival_wait, queue_is_full
from app.batching.batch import Batch, Refused, Tracked, Work
from app.batching.finish import finish_reason, must_continue
from app.batching.oom import retry_in_halves
from app.batching.plan import SequenceView, plan_step
from app.config import Profile
from app.contract.sampling import SamplingParams
from app.contract.step import PrefillChunk, RowOutput, StepOutOfMemory, StepPlan, StepResult

PROFILE = Profile("test", max_batch_size=2, max_queue=2, prefill_chunk_tokens=8, max_consecutive_prefills=2)
GREEDY = SamplingParams(max_tokens=3, temperature=0.0)
STOP = 99


def request(name: str, prompt_length: int = 4, **params: object) -> Tracked[str]:
    sampling = dataclasses.replace(GREEDY, **params)  # type: ignore[arg-type]
    return Tracked(name, tuple(range(1, prompt_length + 1)), sampling, frozenset({STOP}), 0.0, None, f"reply-{name}")


def prefill(*chunks: tuple[str, int]) -> StepPlan:
    return StepPlan(chunks=tuple(PrefillChunk(seq_id, n) for seq_id, n in chunks))


def row(num_computed: int, *tokens: int) -> RowOutput:
    """What a runner reports of a row: where it stands, and the tokens it got."""
    return RowOutput(num_computed, tokens)


# -- admission ---------------------------------------------------------------------------------------
def test_the_queue_bound_counts_only_requests_beyond_the_free_rows() -> None:
    assert not queue_is_full(waiting=3, running=0, profile=PROFILE)  # 2 take rows now, 1 queues
    assert queue_is_full(waiting=4, running=0, profile=PROFILE)
    assert queue_is_full(waiting=2, running=2, profile=PROFILE)
    assert not queue_is_full(waiting=1, running=2, profile=PROFILE)


def test_retry_after_is_at_least_a_second_and_grows_with_the_queue_and_the_steps() -> None:
    rate = DrainRate()
    assert rate.retry_after(10) == 1.0  # nothing measured yet
    rate.observe_decode(seconds=0.5, batch=2, running=2)
    assert rate.retry_after(3) == pytest.approx(0.5 * 4)
    rate.observe_decode(seconds=1.5, batch=2, running=2)
    assert rate.per_request == pytest.approx(0.9 * 0.5 + 0.1 * 1.5), "smoothed, not the last step alone"
    assert rate.retry_after(0) == 1.0


def test_the_arrival_window_applies_only_to_an_idle_batch() -> None:
    windowed = dataclasses.replace(PROFILE, arrival_window_ms=5)
    assert arrival_wait(waiting=1, running=0, profile=windowed) == 0.005
    assert arrival_wait(waiting=1, running=1, profile=windowed) == 0.0
    assert arrival_wait(waiting=0, running=0, profile=windowed) == 0.0


# -- finish reasons ------------------------------------------------------------------------------------
def test_stop_tokens_end_a_request_unless_min_tokens_or_ignore_eos_hold_it() -> None:
    stops = frozenset({STOP})
    assert finish_reason(STOP, 1, GREEDY, stops, 10, 100) == ("stop", True)
    held = dataclasses.replace(GREEDY, min_tokens=2)
    assert finish_reason(STOP, 1, held, stops, 10, 100) == (None, False)
    assert finish_reason(STOP, 2, held, stops, 10, 100) == ("stop", True)
    ignoring = dataclasses.replace(GREEDY, ignore_eos=True)
    assert finish_reason(STOP, 1, ignoring, stops, 10, 100) == (None, False)
    assert must_continue(1, held) and not must_continue(2, held)
    assert not must_continue(0, dataclasses.replace(held, ignore_eos=True))


def test_length_ends_at_max_tokens_or_at_the_context() -> None:
    stops = frozenset({STOP})
    assert finish_reason(7, 2, GREEDY, stops, 10, 100) == (None, False)
    assert finish_reason(7, 3, GREEDY, stops, 10, 100) == ("length", False)
    assert finish_reason(7, 1, GREEDY, stops, 100, 100) == ("length", False)
    assert finish_reason(7, 1, GREEDY, stops, 99, 100) == (None, False)


# -- the step plan -------------------------------------------------------------------------------------
def test_new_prompts_are_prefilled_first_within_the_chunk_budget() -> None:
    views = [SequenceView("a", 5), SequenceView("b", 6), SequenceView("c", 0)]
    plan = plan_step(views, consecutive_prefills=0, profile=PROFILE)
    assert plan == prefill(("a", 5), ("b", 3))  # 8 tokens in all


def test_decoders_get_a_step_after_the_prefills_in_a_row() -> None:
    views = [SequenceView("a", 5), SequenceView("c", 0)]
    assert plan_step(views, consecutive_prefills=2, profile=PROFILE) == StepPlan(("c",))
    assert plan_step([SequenceView("a", 5)], consecutive_prefills=9, profile=PROFILE) == prefill(("a", 5))
    assert plan_step([], consecutive_prefills=0, profile=PROFILE) is None


# -- the batch -----------------------------------------------------------------------------------------
def test_requests_join_as_rows_free_and_the_queue_refuses_past_its_bound() -> None:
    batch: Batch[str] = Batch(PROFILE, max_context=100)
    assert [batch.offer(request(name)) for name in "abcd"] == [1, 2, 3, 4]
    refused = batch.offer(request("e"))
    assert isinstance(refused, Refused) and refused.retry_after >= 1
    work = batch.take_work()
    assert [r.request_id for r in work.joins] == ["a", "b"] and work.plan == prefill(("a", 4), ("b", 4))
    assert [r.request_id for r in batch.waiting] == ["c", "d"]


def test_a_step_moves_prompts_on_and_ends_requests_by_their_tokens() -> None:
    batch: Batch[str] = Batch(PROFILE, max_context=100)
    batch.offer(request("a"))
    batch.offer(request("b", max_tokens=1))
    work = batch.take_work()
    assert work.plan is not None
    outcome = batch.apply_step(work.plan, StepResult({"a": row(4, 7), "b": row(4, 8)}, "prefill", 2, 8, 0.1), now=1.0)
    assert [(d.request.request_id, d.token, d.index, d.finish, d.first) for d in outcome.deliveries] == [
        ("a", 7, 0, None, True),
        ("b", 8, 0, "length", True),
    ]
    assert list(batch.running) == ["a"] and batch.running["a"].num_computed == 4
    work = batch.take_work()
    assert work.releases == ["b"] and work.plan == StepPlan(("a",))
    assert work.plan is not None
    outcome = batch.apply_step(work.plan, StepResult({"a": row(5, STOP)}, "decode", 1, 1, 0.1), now=1.5)
    assert [(d.finish, d.is_stop_token, d.first) for d in outcome.deliveries] == [("stop", True, False)]
    assert outcome.gaps == [0.5] and batch.steps == 2


def test_min_tokens_are_passed_to_the_runner_as_who_must_continue() -> None:
    batch: Batch[str] = Batch(PROFILE, max_context=100)
    batch.offer(request("held", min_tokens=2))
    batch.offer(request("free"))
    work = batch.take_work()
    assert work.must_continue == frozenset({"held"})


def test_an_aborted_running_request_is_reported_once_its_row_is_freed_with_the_steps_since() -> None:
    batch: Batch[str] = Batch(PROFILE, max_context=100)
    batch.offer(request("a", max_tokens=50))
    work = batch.take_work()
    assert work.plan is not None
    batch.apply_step(work.plan, StepResult({"a": row(4, 7)}, "prefill", 1, 4, 0.1), now=1.0)
    ended = batch.abort("a", "client_disconnect", sent_at=1.2, steps=batch.steps, now=1.3)
    assert ended is not None and ended.reason == "cancelled" and ended.row_held and ended.teardown is None
    assert batch.abort("a", "client_disconnect", 1.2, batch.steps, 1.3) is None, "idempotent"
    work = batch.take_work()
    assert work.releases == ["a"] and work.plan is None
    (freed,) = batch.apply_freed(work.releases, now=1.5)
    assert freed.teardown is not None and not freed.row_held
    assert (freed.teardown.steps, freed.teardown.reason) == (0, "client_disconnect")
    assert freed.teardown.seconds == pytest.approx(0.3)
    assert batch.apply_freed(work.releases, now=2.0) == [], "reported once"


def test_tokens_of_a_request_aborted_during_its_step_are_dropped_and_the_step_counted() -> None:
    batch: Batch[str] = Batch(PROFILE, max_context=100)
    batch.offer(request("a", max_tokens=50))
    batch.offer(request("b", max_tokens=50))
    work = batch.take_work()
    assert work.plan is not None
    steps_at_abort = batch.steps
    batch.abort("a", "stalled", 1.0, steps_at_abort, 1.0)  # arrived while the step ran
    outcome = batch.apply_step(work.plan, StepResult({"a": row(4, 5), "b": row(4, 6)}, "prefill", 2, 8, 0.1), now=1.1)
    assert [d.request.request_id for d in outcome.deliveries] == ["b"]
    (freed,) = batch.apply_freed(batch.take_work().releases, now=1.2)
    assert freed.teardown is not None and freed.teardown.steps == 1, "the step in flight ran"


def test_an_aborted_queued_request_holds_no_row_and_is_done_at_once() -> None:
    batch: Batch[str] = Batch(PROFILE, max_context=100)
    batch.offer(request("queued"))
    ended = batch.abort("queued", "timeout", sent_at=1.0, steps=0, now=1.0)
    assert ended is not None and ended.reason == "timeout" and not ended.row_held
    assert ended.teardown is not None and ended.teardown.steps == 0
    assert batch.idle


def test_deadlines_expire_queued_and_running_requests() -> None:
    batch: Batch[str] = Batch(PROFILE, max_context=100)
    batch.offer(dataclasses.replace(request("soon"), deadline=2.0))
    batch.offer(dataclasses.replace(request("later"), deadline=5.0))
    assert batch.next_deadline() == 2.0
    assert [e.request.request_id for e in batch.abort_expired(now=3.0)] == ["soon"]
    assert batch.next_deadline() == 5.0


def test_a_failed_step_ends_its_requests_once_and_frees_their_rows() -> None:
    batch: Batch[str] = Batch(PROFILE, max_context=100)
    batch.offer(request("a"))
    batch.offer(request("b"))
    work = batch.take_work()  # both join, and both are in the plan
    failed = batch.fail_step(work)
    assert [r.request_id for r in failed] == ["a", "b"], "each once"
    assert batch.take_work().releases == ["a", "b"] and batch.failing_steps == 1
    assert batch.stats().degraded is False


# -- out of memory -------------------------------------------------------------------------------------
def test_an_out_of_memory_step_runs_again_as_halves() -> None:
    ran: list[StepPlan] = []

    def run(plan: StepPlan) -> StepResult:
        ran.append(plan)
        if len(plan.seq_ids) > 2:
            raise StepOutOfMemory("too big")
        return StepResult({s: row(5, 1) for s in plan.seq_ids}, "decode", len(plan.seq_ids), len(plan.seq_ids), 0.1)

    def by_halves(ids: object) -> tuple[list[str], list[str]]:
        names = list(ids)  # type: ignore[call-overload]
        return names[:2], names[2:]

    result = retry_in_halves(StepPlan(("a", "b", "c", "d")), run, by_halves)
    assert ran == [StepPlan(("a", "b")), StepPlan(("c", "d"))]
    assert result.rows == dict.fromkeys("abcd", row(5, 1)) and result.failed == {} and result.batch == 4
    lone = retry_in_halves(StepPlan(("a",)), run, by_halves)
    assert lone.failed == {"a": "out_of_memory"} and lone.rows == {}
    six = retry_in_halves(prefill(*((s, 4) for s in "abcdef")), run, by_halves)
    assert set(six.failed) == set("abcdef"), "halves of three still do not fit: they fail, nothing is lost"


# -- forks: the choices of one request share one prefill ----------------------------------------------
FORKING = dataclasses.replace(PROFILE, max_batch_size=4, max_queue=4, max_consecutive_prefills=4)


def child(name: str, parent: str, prompt_length: int = 4, **params: object) -> Tracked[str]:
    return dataclasses.replace(request(name, prompt_length, **params), fork_from=parent)


def joined(work: Work[str]) -> list[tuple[str, str | None]]:
    return [(r.request_id, r.fork_from) for r in work.joins]


def test_a_forked_request_waits_for_its_parents_prefill_and_holds_up_no_one_behind_it() -> None:
    """Breakage caught: a child that joins before its parent's keys are in (it would copy keys not
    written yet), a held child that blocks the queue, a child that prefills its whole prompt."""
    batch: Batch[str] = Batch(FORKING, max_context=100)
    batch.offer(request("p", prompt_length=12))
    batch.offer(child("c", "p", prompt_length=12))
    batch.offer(request("o"))
    work = batch.take_work()
    assert joined(work) == [("p", None), ("o", None)], "c waits; o, behind it, goes on"
    assert work.plan == prefill(("p", 8))
    batch.apply_step(work.plan, StepResult({"p": row(8)}, "prefill", 1, 8, 0.1), now=1.0)
    work = batch.take_work()
    assert joined(work) == [] and [r.request_id for r in batch.waiting] == ["c"], "p is still prefilling"
    assert work.plan == prefill(("p", 4), ("o", 4))
    batch.apply_step(work.plan, StepResult({"p": row(12, 7), "o": row(4, 8)}, "prefill", 2, 8, 0.1), now=2.0)
    work = batch.take_work()
    assert joined(work) == [("c", "p")]
    assert work.plan == prefill(("c", 1)), "c joins with p's keys: its last prompt token is left"
    batch.apply_starts({"c": 11})
    outcome = batch.apply_step(work.plan, StepResult({"c": row(12, 9)}, "prefill", 1, 1, 0.1), now=3.0)
    assert [(d.request.request_id, d.index, d.first) for d in outcome.deliveries] == [("c", 0, True)]
    assert batch.take_work().plan == StepPlan(("p", "o", "c"))


def test_a_child_forks_from_a_parent_that_is_already_decoding() -> None:
    batch: Batch[str] = Batch(FORKING, max_context=100)
    batch.offer(request("p", max_tokens=10))
    work = batch.take_work()
    assert work.plan is not None
    batch.apply_step(work.plan, StepResult({"p": row(4, 7)}, "prefill", 1, 4, 0.1), now=1.0)
    batch.offer(child("c", "p"))
    work = batch.take_work()
    assert joined(work) == [("c", "p")] and work.plan == prefill(("c", 1))


def test_a_child_whose_parent_is_gone_joins_with_a_full_prefill_of_its_own() -> None:
    """The parent was a cache hit (never here), was aborted while waiting, or ended with its
    first token: the child must not wait for it, nor name it to the runner.

    Breakage caught: a child held for ever, or one forked from a row that is freed."""
    batch: Batch[str] = Batch(FORKING, max_context=100)
    batch.offer(child("never_here", "cache-hit"))
    assert joined(batch.take_work()) == [("never_here", None)]

    batch = Batch(FORKING, max_context=100)
    batch.offer(request("p"))
    batch.offer(child("c", "p"))
    batch.offer(request("x"))
    batch.abort("p", "client_disconnect", 0.0, 0, 0.0)
    work = batch.take_work()
    assert joined(work) == [("c", None), ("x", None)] and work.plan == prefill(("c", 4), ("x", 4))

    batch = Batch(FORKING, max_context=100)
    batch.offer(request("p", max_tokens=1))
    batch.offer(child("c", "p"))
    work = batch.take_work()
    assert joined(work) == [("p", None)] and work.plan is not None
    outcome = batch.apply_step(work.plan, StepResult({"p": row(4, 7)}, "prefill", 1, 4, 0.1), now=1.0)
    assert outcome.deliveries[0].finish == "length"
    work = batch.take_work()
    assert work.releases == ["p"] and joined(work) == [("c", None)], "p's row is freed in this trip"
    assert work.plan == prefill(("c", 4))


def test_a_child_whose_parent_failed_or_has_another_prompt_does_not_fork() -> None:
    batch: Batch[str] = Batch(FORKING, max_context=100)
    batch.offer(request("p"))
    batch.offer(child("c", "p"))
    work = batch.take_work()
    assert work.plan is not None
    batch.apply_step(work.plan, StepResult({}, "prefill", 1, 4, 0.1, failed={"p": "non_finite_logits"}), now=1.0)
    assert joined(batch.take_work()) == [("c", None)]

    batch = Batch(FORKING, max_context=100)
    batch.offer(request("p", prompt_length=5))
    work = batch.take_work()
    assert work.plan is not None
    batch.apply_step(work.plan, StepResult({"p": row(5, 7)}, "prefill", 1, 5, 0.1), now=1.0)
    batch.offer(child("c", "p", prompt_length=4))
    work = batch.take_work()
    assert joined(work) == [("c", None)] and work.plan == prefill(("c", 4))


def test_a_held_child_waits_for_a_row_like_anyone_and_can_be_aborted() -> None:
    full = dataclasses.replace(FORKING, max_batch_size=2)
    batch: Batch[str] = Batch(full, max_context=100)
    batch.offer(request("p"))
    batch.offer(child("c", "p"))
    batch.offer(request("o"))
    batch.offer(request("late"))
    work = batch.take_work()
    assert joined(work) == [("p", None), ("o", None)] and work.plan is not None
    batch.apply_step(work.plan, StepResult({"p": row(4, 1), "o": row(4, 2)}, "prefill", 2, 8, 0.1), now=1.0)
    assert joined(batch.take_work()) == [], "no free row"
    ended = batch.abort("c", "client_disconnect", 1.0, batch.steps, 1.0)
    assert ended is not None and not ended.row_held
    assert [r.request_id for r in batch.waiting] == ["late"]

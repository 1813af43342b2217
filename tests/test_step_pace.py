"""The pace of mixed steps: prompt chunks sized so that a mixed step stays within the profile's
multiple of a decode step, learned from the steps' own times. Pure."""

from __future__ import annotations

import dataclasses

import pytest

from app.batching.oom import retry_mixed_apart
from app.batching.plan import SequenceView, plan_step
from app.batching.step_pace import MIN_CHUNK, StepPace
from app.config import PROFILES, ConfigError
from app.contract.step import PrefillChunk, RowOutput, StepPlan, StepResult


def test_until_both_costs_are_measured_the_budget_alone_decides() -> None:
    pace = StepPace()
    assert pace.prompt_room(250, 1.6) == 250
    pace.observe("decode", 0.100, 0)
    assert pace.prompt_room(250, 1.6) == 250  # no prompt token measured yet
    pace.observe("prefill", 0.500, 100)  # a first guess: 5 ms a token
    assert pace.prompt_room(250, 1.6) == MIN_CHUNK  # 12 would fit: a waiting prompt gets 16
    assert pace.prompt_room(250, 0) == 250  # no bound asked


def test_a_mixed_steps_extra_time_over_a_decode_step_sizes_the_next_chunk() -> None:
    pace = StepPace()
    pace.observe("decode", 0.100, 0)
    for _ in range(30):  # a steady machine: each prompt token adds 1 ms to a 100 ms step
        pace.observe("mixed", 0.100 + 0.001 * 50, 50)
    assert pace.token_seconds == pytest.approx(0.001)
    assert pace.prompt_room(250, 1.6) == 60  # 0.6 x 100 ms of prompt tokens at 1 ms
    assert pace.prompt_room(40, 1.6) == 40  # never more than the budget leaves
    assert pace.prompt_room(250, 3.0) == 200


def test_a_slow_machine_still_lets_a_prompt_in_a_little_at_a_time() -> None:
    pace = StepPace()
    pace.observe("decode", 0.100, 0)
    pace.observe("mixed", 1.100, 20)  # 50 ms a token: nothing would fit in 0.6 of a step
    assert pace.prompt_room(250, 1.6) == MIN_CHUNK
    assert pace.prompt_room(5, 1.6) == 5


def test_the_plan_carries_the_chunk_the_pace_allows() -> None:
    profile = dataclasses.replace(PROFILES["latency_first"], step_token_budget=100)
    running = [SequenceView("a", 0), SequenceView("b", 0), SequenceView("c", 300)]
    plan = plan_step(running, 0, profile, lambda room: min(room, 24))
    assert plan == StepPlan(("a", "b"), (PrefillChunk("c", 24),))
    assert plan_step(running, 0, profile) == StepPlan(("a", "b"), (PrefillChunk("c", 98),))
    # As many prompts waiting as rows decoding: they go in at the budget's pace, not the bound's.
    crowd = [*running, SequenceView("d", 300)]
    assert plan_step(crowd, 0, profile, lambda room: min(room, 24)) == StepPlan(("a", "b"), (PrefillChunk("c", 98),))


def test_the_slowdown_is_checked() -> None:
    assert PROFILES["latency_first"].mixed_step_slowdown > 1
    for bad in (-1.0, 0.5, 1.0, True):
        with pytest.raises(ConfigError, match="mixed_step_slowdown"):
            dataclasses.replace(PROFILES["latency_first"], mixed_step_slowdown=bad)


def test_a_mixed_step_that_raises_is_run_again_apart_and_only_the_faulty_part_fails() -> None:
    ran: list[StepPlan] = []

    def run(plan: StepPlan) -> StepResult:
        ran.append(plan)
        if plan.chunks:
            raise RuntimeError("device-side assert triggered")
        rows = dict.fromkeys(plan.seq_ids, RowOutput(5, (7,)))
        return StepResult(rows, "decode", len(plan.seq_ids), len(plan.seq_ids), 0.1)

    result = retry_mixed_apart(StepPlan(("a", "b"), (PrefillChunk("c", 30),)), run)
    assert [p.kind for p in ran] == ["decode", "prefill"]
    assert result.rows == dict.fromkeys("ab", RowOutput(5, (7,))) and result.failed == {"c": "step_failed"}
    assert result.kind == "mixed" and result.batch == 2

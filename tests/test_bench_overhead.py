"""tools/bench_overhead.py at a tiny size: both sides run every stream to its length, the bare loop
runs the scheduler's steps, and the table has a row per level."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import pytest

from app.config import PROFILES
from app.contract.step import StepPlan, StepResult
from app.engine.loader import ModelWeights, serve_weights
from tests.conftest import BARE, server_config, server_in_thread
from tools import bench_overhead as bench

LEVELS = (1, 2)
TOKENS = 4


def workload(weights: ModelWeights, chunk: int = 512) -> bench.Workload:
    profile = dataclasses.replace(PROFILES["latency_first"], max_batch_size=8, prefill_chunk_tokens=chunk)
    texts, ids = bench.make_prompts(weights, max(LEVELS), 16)
    return bench.Workload(LEVELS, tuple(texts), tuple(ids), TOKENS, 1, profile)


def test_both_sides_generate_what_was_asked_and_the_table_has_a_row_per_level(
    smollm2_weights: ModelWeights,
) -> None:
    plan = workload(smollm2_weights)
    model = serve_weights(smollm2_weights, BARE, max_batch_size=plan.profile.max_batch_size)
    with server_in_thread(smollm2_weights, server_config(model="smollm2-135m")) as url:
        rows = bench.measure(url, model, plan, log=False)
    assert [row.streams for row in rows] == list(LEVELS)
    for row in rows:
        for side in (row.server, row.bare):
            assert side.tokens == (TOKENS,) * row.streams
            assert len(side.ttfts) == row.streams and all(0 < t <= side.wall for t in side.ttfts)
            assert side.tokens_per_s == pytest.approx(TOKENS * row.streams / side.wall)
        assert row.ratio == pytest.approx(row.server.tokens_per_s / row.bare.tokens_per_s)
    lines = bench.render_table(rows).splitlines()
    assert len(lines) == 2 + len(LEVELS)
    assert lines[0].startswith("| streams | server tok/s | bare tok/s | server / bare |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| 1", "| 2"]


def test_the_prompts_are_distinct_and_the_same_tokens_the_server_prefills(smollm2_weights: ModelWeights) -> None:
    texts, ids = bench.make_prompts(smollm2_weights, 3, 16)
    assert len(set(texts)) == 3 and all(abs(len(prompt) - 16) <= 2 for prompt in ids)
    assert list(ids[0]) == smollm2_weights.tokenizer.encode(texts[0]), "a raw prompt is tokenized as is"


def test_the_bare_loop_steps_as_the_scheduler_plans(smollm2_weights: ModelWeights) -> None:
    """A prefill budget under one prompt: the prompts are prefilled in chunks over several steps,
    and every stream still gets its tokens, its first one at the end of its prefill."""
    plan = workload(smollm2_weights, chunk=8)
    model = serve_weights(smollm2_weights, BARE, max_batch_size=plan.profile.max_batch_size)
    steps: list[str] = []
    runner = model.runner

    step = runner.step

    def counted(plan: StepPlan, must_continue: Collection[str] = ()) -> StepResult:
        steps.append(plan.kind)
        return step(plan, must_continue)

    runner.step = counted  # type: ignore[method-assign]
    # Mixed steps off: every prompt token then goes through a prefill step of at most 8.
    alternating = dataclasses.replace(plan.profile, step_token_budget=0)
    figures = bench.bare_round(model, plan.prompt_ids[:2], TOKENS, alternating)
    assert figures.tokens == (TOKENS, TOKENS)
    prompt_tokens = sum(len(p) for p in plan.prompt_ids[:2])
    assert steps.count("prefill") == -(-prompt_tokens // 8), "8 prompt tokens per prefill step"
    assert steps.count("decode") >= TOKENS - 1
    assert runner.free_rows == runner.max_batch_size, "every row was released"


def test_the_command_prints_the_table_and_the_verdict(
    smollm2_weights: ModelWeights, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--streams", "1", "--tokens", "2", "--prompt-tokens", "8", "--rounds", "1", "--bar-streams", "1"]
    with server_in_thread(smollm2_weights, server_config(model="smollm2-135m")) as url:
        passed = bench.main([*argv, "--url", url, "--min-ratio", "0"])
        failed = bench.main([*argv, "--url", url, "--min-ratio", "1000"])
    out = capsys.readouterr().out
    assert (passed, failed) == (0, 1)
    assert out.count("| streams | server tok/s |") == 2 and "2 tokens per stream" in out
    assert "(needs >= 0.0): PASS" in out and "(needs >= 1000.0): FAIL" in out

"""tools/bench_structured.py: both phases generate exactly what they ask, and the verdict's arithmetic."""

from __future__ import annotations

import httpx
import trio

from app.engine.loader import ModelWeights
from tests.conftest import server_in_thread
from tools.bench_structured import body, grammar_cost, phase


def test_both_phases_run_to_length_and_the_constrained_one_is_json(tiny_weights: ModelWeights) -> None:
    with server_in_thread(tiny_weights) as url:
        plain_rate, plain = trio.run(phase, url, 2, 12, False)
        constrained_rate, constrained = trio.run(phase, url, 2, 12, True)
        answer = httpx.post(f"{url}/generate", json=body("p", 12, True) | {"stream": False}, timeout=60).json()
    assert [r.tokens for r in plain] == [12, 12] and [r.tokens for r in constrained] == [12, 12]
    assert plain_rate > 0 and constrained_rate > 0
    assert answer["finish_reason"] == "length" and answer["text"].startswith('{"items": [')
    assert "ignore_eos" not in body("p", 12, True) and body("p", 12, False)["ignore_eos"] is True


def test_the_cost_is_the_best_constrained_round_against_the_best_plain_one() -> None:
    assert grammar_cost({"plain": [100.0, 80.0], "json_schema": [90.0, 95.0]}) == 1 - 95.0 / 100.0
    assert grammar_cost({"plain": [100.0], "json_schema": [120.0]}) < 0  # faster costs nothing

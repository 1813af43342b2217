"""tools/bench_grammar_stall.py: its regexes compile (none refused up front or cached), its arithmetic."""

from __future__ import annotations

from app.text.repetitions import regex_repetition_error
from tools.bench_grammar_stall import DEFAULT_LENGTH, Latencies, slow_regexes


def test_the_slow_regexes_are_new_each_run_and_under_the_repetition_bound() -> None:
    first, second = slow_regexes(5, DEFAULT_LENGTH), slow_regexes(5, DEFAULT_LENGTH)
    assert len(set(first)) == 5 and not set(first) & set(second)
    assert all(regex_repetition_error(regex) is None for regex in first)


def test_the_ratio_is_median_alongside_over_median_alone() -> None:
    assert Latencies([1.0, 2.0, 9.0], [3.0, 3.0, 0.1], [200]).ratio == 1.5
    assert Latencies([1.0], [130.0], [200] * 5).ratio == 130.0

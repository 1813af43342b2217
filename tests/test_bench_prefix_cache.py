"""tools/bench_prefix_cache.py at a tiny size: its chats reuse their earlier turns only with the
cache on, and the summary's arithmetic."""

from __future__ import annotations

import pytest
import trio

from tests.conftest import server_config, server_in_thread, weights
from tools.bench_prefix_cache import Summary, Turn, phase, speedup, summarize, system_prompt


@pytest.mark.parametrize("name", ["tiny-gpt-oss", "smollm2-135m"])
def test_later_turns_reuse_the_earlier_ones_only_with_the_cache_on(name: str) -> None:
    model = weights(name)
    workload = (2, 2, 200, 3, name)  # 2 chats x 2 turns, a ~200-token system prompt
    with server_in_thread(model, server_config(model=name, prefix_cache_bytes=0)) as url:
        off = trio.run(phase, url, *workload)
    with server_in_thread(model, server_config(model=name)) as url:
        on = trio.run(phase, url, *workload)
    assert [(t.conversation, t.turn) for t in off] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(t.cached_tokens == 0 for t in off)
    later = [t for t in on if t.turn == 2]
    # A second turn resumes where its first turn's prompt ended (block-aligned, 32 tokens each).
    first = {t.conversation: t.prompt_tokens for t in on if t.turn == 1}
    assert all(first[t.conversation] - 32 < t.cached_tokens < t.prompt_tokens for t in later)
    # Greedy: the same answers, so the same next prompts, with the cache as without it.
    assert [(t.prompt_tokens, t.answer) for t in on] == [(t.prompt_tokens, t.answer) for t in off]
    assert any(t.answer for t in on)


def test_the_summary_is_turn_one_apart_and_the_speedup_is_p50_against_p50() -> None:
    turns = [Turn(0, 1, 100.0, 50, 0), Turn(0, 2, 40.0, 60, 32), Turn(0, 3, 20.0, 70, 64)]
    summary = summarize(turns)
    assert (summary.first_turn_ms, summary.later_turns_ms, summary.cached_tokens) == (100.0, 30.0, 48.0)
    assert speedup(Summary(1, 90.0, 1, 1, 1), Summary(1, 30.0, 1, 1, 1)) == 3.0
    assert 900 < len(system_prompt(1000).split()) * 1.3 < 1100

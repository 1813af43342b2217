"""Token choice: the sampling filters (top-k, top-p, min-p), seeds, and the penalties.

Each filter is checked on known logits with hundreds of seeded draws: every draw must lie inside
the set the filter keeps, and every token of that set must come up (a filter that keeps too little
fails too). Seeded draws are deterministic, so these counts are the same on every run.

Breakage each test catches: a filter disabled in app/engine/sampling.py (the draws then leave its
set), a filter that keeps one token too few or too many, a generator shared between requests or
re-seeded per draw, a penalty that is not applied when sampling.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import torch

from app.contract.sampling import SamplingParams
from app.engine.sampling import TokenHistory, choose_tokens, seeded_generator

GREEDY = SamplingParams(max_tokens=64, temperature=0.0)
CPU = torch.device("cpu")
DRAWS = 400


def draws(
    logits: list[float], params: SamplingParams, seed: int = 0, history: TokenHistory | None = None
) -> list[int | None]:
    """DRAWS tokens from one row's logits, drawn one step at a time from one request's generator."""
    row = torch.tensor([logits])
    generator = seeded_generator(seed, CPU)
    return [choose_tokens(row, [params], [generator], [()], [history])[0] for _ in range(DRAWS)]


def log_probs(*probabilities: float) -> list[float]:
    return [math.log(p) for p in probabilities]


SAMPLED = SamplingParams(max_tokens=1, temperature=1.0)


def test_top_k_keeps_exactly_the_k_likeliest() -> None:
    nearly_flat = [2.0 - 0.1 * i for i in range(10)]  # every token is likely without the cut
    counts = collections.Counter(draws(nearly_flat, dataclasses.replace(SAMPLED, top_k=3)))
    assert set(counts) == {0, 1, 2}, counts
    unfiltered = collections.Counter(draws(nearly_flat, SAMPLED))
    assert len(unfiltered) == 10, "without the cut every token comes up: the test can tell"


def test_top_p_keeps_the_nucleus() -> None:
    logits = log_probs(0.4, 0.3, 0.2, 0.1)
    # 0.4 alone is under 0.65; with 0.3 it reaches it: the nucleus is the first two.
    counts = collections.Counter(draws(logits, dataclasses.replace(SAMPLED, top_p=0.65)))
    assert set(counts) == {0, 1}, counts
    assert 0.45 < counts[0] / DRAWS < 0.70, counts  # 0.4 / 0.7 = 0.57 of the draws
    # The likeliest token is always kept, however small top_p is.
    assert set(draws(logits, dataclasses.replace(SAMPLED, top_p=0.01))) == {0}
    # Even one that float32 holds as zero (issue 24: every token was dropped, the draw failed).
    assert set(draws(logits, dataclasses.replace(SAMPLED, top_p=1e-300))) == {0}
    assert set(draws(logits, dataclasses.replace(SAMPLED, top_p=0.95))) == {0, 1, 2, 3}


def test_min_p_drops_what_is_less_likely_than_its_share_of_the_likeliest() -> None:
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    counts = collections.Counter(draws(logits, dataclasses.replace(SAMPLED, min_p=0.25)))  # cut at 0.125
    assert set(counts) == {0, 1, 2}, counts
    assert set(draws(logits, dataclasses.replace(SAMPLED, min_p=0.5))) == {0, 1}  # cut at 0.25
    assert set(draws(logits, SAMPLED)) == {0, 1, 2, 3}


def test_filters_judge_the_distribution_after_temperature() -> None:
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    # At temperature 2 the distribution flattens (0.37, 0.29, 0.20, 0.12): min_p 0.25 keeps all four.
    hot = dataclasses.replace(SAMPLED, temperature=2.0, min_p=0.25)
    assert set(draws(logits, hot)) == {0, 1, 2, 3}


def test_filters_combine() -> None:
    logits = [3.0, 2.9, 2.8, 2.7, 2.6, 0.0]
    both = dataclasses.replace(SAMPLED, top_k=4, top_p=0.5)
    counts = collections.Counter(draws(logits, both))
    assert set(counts) == {0, 1}, counts  # top-k leaves 0..3 (about a quarter each); top-p the first two


def test_a_seed_reproduces_its_draws_and_another_seed_does_not() -> None:
    flat = [0.0] * 50
    first = draws(flat, SAMPLED, seed=11)
    assert draws(flat, SAMPLED, seed=11) == first
    assert draws(flat, SAMPLED, seed=12) != first
    assert len(set(first)) > 40, "a flat distribution is sampled, not collapsed to one token"


def test_rows_of_one_batch_draw_from_their_own_generators() -> None:
    logits = torch.zeros(3, 50)
    params = [SAMPLED, GREEDY, SAMPLED]
    alone = choose_tokens(logits[:1], [SAMPLED], [seeded_generator(5, CPU)], [()])
    together = choose_tokens(logits, params, [seeded_generator(5, CPU), None, seeded_generator(6, CPU)], [(), (), ()])
    assert together[0] == alone[0], "a row's draw does not depend on what shares its batch"
    assert together[1] == 0  # greedy: argmax of a flat row is its first token


def test_greedy_honours_suppressed_tokens() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    assert choose_tokens(logits, [GREEDY], [None], [()]) == [1]
    assert choose_tokens(logits, [GREEDY], [None], [(1,)]) == [2]


def test_penalties_shift_sampled_draws_away_from_repeated_tokens() -> None:
    flat = [0.0] * 4
    history = TokenHistory([], vocab_size=4, device=CPU)
    for _ in range(3):
        history.add(0)
    plain = collections.Counter(draws(flat, SAMPLED, history=history))
    frequency = collections.Counter(draws(flat, dataclasses.replace(SAMPLED, frequency_penalty=1.0), history=history))
    presence = collections.Counter(draws(flat, dataclasses.replace(SAMPLED, presence_penalty=2.0), history=history))
    assert plain[0] > DRAWS * 0.18, plain  # about a quarter: the history alone changes nothing
    assert frequency[0] < DRAWS * 0.05, frequency  # e^-3 against 3: 1.6%
    assert presence[0] < DRAWS * 0.10, presence  # e^-2 against 3: 4.3%
    assert sum(frequency.values()) == DRAWS and set(frequency) >= {1, 2, 3}


def test_frequency_and_presence_penalties_follow_the_output_counts() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 2.0]])
    before = logits.clone()
    history = TokenHistory([3], vocab_size=4, device=torch.device("cpu"))
    history.add(1)
    history.add(1)

    def pick(presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0) -> int:
        params = dataclasses.replace(
            GREEDY,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
        )
        (token,) = choose_tokens(logits, [params], [None], [()], [history])
        assert token is not None
        return token

    assert pick() == 1
    assert pick(frequency_penalty=0.3) == 2  # 3.0 - 2 x 0.3 = 2.4 < 2.5
    assert pick(presence_penalty=0.4) == 1  # 3.0 - 0.4 = 2.6: presence counts once
    assert pick(presence_penalty=0.6) == 2
    assert pick(repetition_penalty=2.0) == 2  # 3.0 / 2 = 1.5; the prompt's token 3 falls to 1.0
    assert pick(frequency_penalty=-1.0, repetition_penalty=2.0) == 1  # negative: encouraged (1.5 + 2)
    negative = torch.tensor([[-1.0, -0.5, -0.6, -3.0]])
    repeat = dataclasses.replace(GREEDY, repetition_penalty=1.5)
    assert choose_tokens(negative, [repeat], [None], [()], [history]) == [2]  # -0.5 x 1.5 = -0.75 < -0.6
    assert torch.equal(logits, before), "the model's logits are never edited in place"
    # Without a history (a request without penalties) nothing changes.
    assert choose_tokens(logits, [dataclasses.replace(GREEDY, frequency_penalty=2.0)], [None], [()], [None]) == [1]


def test_a_row_whose_choice_fails_fails_alone_on_every_sampling_path() -> None:
    """Breakage caught: one row's sampling error raised out of choose_tokens and failed the whole
    step (every request in the batch); checked for a sampled row, a penalised greedy row and a
    penalised sampled row, beside healthy greedy and sampled rows."""
    torch.manual_seed(0)
    logits = torch.randn(5, 16) * 5
    overflowing = dataclasses.replace(SAMPLED, temperature=1e-40)  # inf / nan probabilities: multinomial raises
    broken = TokenHistory([], vocab_size=3, device=CPU)  # the wrong width: its penalty raises
    penalised = dataclasses.replace(GREEDY, presence_penalty=1.0)
    params = [SAMPLED, overflowing, penalised, dataclasses.replace(SAMPLED, frequency_penalty=0.5), GREEDY]
    histories: list[TokenHistory | None] = [None, None, broken, broken, None]
    generators = [seeded_generator(i, CPU) for i in range(5)]
    chosen = choose_tokens(logits, params, generators, [()] * 5, histories)
    assert chosen[1] is None and chosen[2] is None and chosen[3] is None, chosen
    assert chosen[0] is not None and chosen[4] == int(torch.argmax(logits[4]))

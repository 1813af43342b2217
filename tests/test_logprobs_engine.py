"""Logprobs in the runners: the model's raw log-softmax, for the rows that asked, batch-independent."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from app.contract.sampling import SamplingParams
from app.contract.step import PrefillChunk, TokenLogprobs
from app.engine.loader import ModelWeights
from app.engine.runner import BaseRunner, ModelRunner
from app.engine.static_runner import StaticModelRunner
from tests.fakes import chosen, chosen_logprobs
from tests.test_engine import random_prompts

TOLERANCE = 1e-4
ASKS = SamplingParams(max_tokens=64, temperature=0.0, logprobs=5)


def generate_with_logprobs(
    runner: BaseRunner, prompt: list[int], params: SamplingParams, n: int, chunk: int = 5
) -> tuple[list[int], list[TokenLogprobs]]:
    """One sequence alone: chunked prefill, then decode steps; its tokens and their logprobs."""
    runner.add("a", prompt, params)
    tokens: list[int] = []
    logprobs: list[TokenLogprobs] = []
    while len(tokens) < n:
        prefilling = runner.pending_prompt("a") > 0
        result = runner.prefill([PrefillChunk("a", chunk)]) if prefilling else runner.decode(["a"])
        if "a" in chosen(result):
            tokens.append(chosen(result)["a"])
            logprobs.append(chosen_logprobs(result)["a"])
    runner.release("a")
    return tokens, logprobs


def reference_logprobs(weights: ModelWeights, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward over prompt + output: row i is where output token i was chosen."""
    with torch.inference_mode():
        logits = weights.model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def assert_matches(reference: torch.Tensor, tokens: list[int], logprobs: list[TokenLogprobs], k: int) -> None:
    for row, token, entry in zip(reference, tokens, logprobs, strict=True):
        assert entry.logprob == pytest.approx(float(row[token]), abs=TOLERANCE)
        assert len(entry.top) == k
        values = [value for _, value in entry.top]
        assert values == sorted(values, reverse=True), "alternatives come likeliest first"
        expected = torch.topk(row, k).values.tolist()
        assert values == pytest.approx(expected, abs=TOLERANCE)
        for token_id, value in entry.top:
            assert value == pytest.approx(float(row[token_id]), abs=TOLERANCE)
        assert entry.logprob <= values[0] + TOLERANCE


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_logprobs_are_the_log_softmax_of_the_models_logits(smollm2_weights: ModelWeights, path: str) -> None:
    """Prefill's token and every decoded one, on both runners, against a plain forward.

    Breakage caught: logprobs of the wrong position or row, softmax without the log, a runner that
    skips them."""
    prompt = list(smollm2_weights.tokenizer.encode("The capital of France is Paris. The capital of Italy is"))
    runner: BaseRunner
    if path == "dynamic":
        runner = ModelRunner(smollm2_weights.model, max_batch_size=2, max_context=2048, stop_token_ids=[])
    else:
        runner = StaticModelRunner(
            smollm2_weights.model, max_batch_size=2, max_context=256, stop_token_ids=[], cuda_graphs=False
        )
    tokens, logprobs = generate_with_logprobs(runner, prompt, ASKS, 8)
    assert_matches(reference_logprobs(smollm2_weights, prompt, tokens), tokens, logprobs, 5)
    # Greedy: the chosen token is the likeliest one.
    assert all(entry.top[0][0] == token for token, entry in zip(tokens, logprobs, strict=True))


def test_logprobs_are_raw_under_temperature_and_penalties(smollm2_weights: ModelWeights) -> None:
    """What the sampler does to the logits (temperature, top-k, every penalty) is not in them.

    Breakage caught: logprobs read after the penalties or the temperature (or from the edited row)."""
    prompt = list(smollm2_weights.tokenizer.encode("1, 2, 3, 1, 2, 3, 1, 2, 3,"))
    params = SamplingParams(
        max_tokens=64,
        temperature=1.7,
        top_k=20,
        seed=11,
        presence_penalty=1.5,
        frequency_penalty=1.0,
        repetition_penalty=1.4,
        logprobs=3,
    )
    runner = ModelRunner(smollm2_weights.model, max_batch_size=2, max_context=2048, stop_token_ids=[])
    tokens, logprobs = generate_with_logprobs(runner, prompt, params, 10)
    reference = reference_logprobs(smollm2_weights, prompt, tokens)
    assert_matches(reference, tokens, logprobs, 3)
    processed = torch.log_softmax(reference[0] / params.temperature, dim=-1)
    assert abs(logprobs[0].logprob - float(processed[tokens[0]])) > 0.01, "the test would see tempered logprobs"


def test_a_suppressed_stop_token_keeps_its_raw_logprob(tiny_weights: ModelWeights) -> None:
    """Below min_tokens the stop tokens are masked for the choice, not for the logprobs."""
    prompt = random_prompts(1, 199_000)["s0"]
    probe = ModelRunner(tiny_weights.model, max_batch_size=1, max_context=4096, stop_token_ids=[])
    likeliest = generate_with_logprobs(probe, prompt, ASKS, 1)[0][0]
    runner = ModelRunner(tiny_weights.model, max_batch_size=1, max_context=4096, stop_token_ids=[likeliest])
    runner.add("a", prompt, dataclasses.replace(ASKS, min_tokens=2))
    result = runner.prefill([PrefillChunk("a", len(prompt))], must_continue={"a"})
    entry = chosen_logprobs(result)["a"]
    assert chosen(result)["a"] != likeliest
    assert entry.top[0][0] == likeliest and entry.top[0][1] > entry.logprob


def test_only_rows_that_asked_get_logprobs_and_each_its_own_count(tiny_weights: ModelWeights) -> None:
    prompts = random_prompts(3, 199_000, seed=5)
    runner = ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])
    runner.add("s0", prompts["s0"], ASKS)
    runner.add("s1", prompts["s1"], dataclasses.replace(ASKS, logprobs=None))
    runner.add("s2", prompts["s2"], dataclasses.replace(ASKS, logprobs=0))
    result = runner.prefill([PrefillChunk(name, len(prompt)) for name, prompt in prompts.items()])
    assert set(chosen(result)) == {"s0", "s1", "s2"}
    assert set(chosen_logprobs(result)) == {"s0", "s2"}, "a row that did not ask gets none"
    assert len(chosen_logprobs(result)["s0"].top) == 5 and chosen_logprobs(result)["s2"].top == ()
    decoded = runner.decode(["s0", "s1", "s2"])
    assert set(chosen_logprobs(decoded)) == {"s0", "s2"}
    nobody = ModelRunner(tiny_weights.model, max_batch_size=1, max_context=4096, stop_token_ids=[])
    nobody.add("x", prompts["s1"], dataclasses.replace(ASKS, logprobs=None))
    assert chosen_logprobs(nobody.prefill([PrefillChunk("x", len(prompts["s1"]))])) == {}


def test_a_rows_logprobs_do_not_depend_on_its_batch(tiny_weights: ModelWeights) -> None:
    """The same sequence alone, then sharing its prefill and decode steps with rows that sample,
    penalise, ask for more alternatives or none: the same tokens and logprobs.

    Breakage caught: the k of another row, rows mixed up after a neighbour's, a batch-wide softmax."""
    prompts = random_prompts(4, 199_000, seed=9)
    mine = dataclasses.replace(ASKS, logprobs=2)
    alone = generate_with_logprobs(
        ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[]), prompts["s0"], mine, 6
    )
    others = {
        "s1": SamplingParams(max_tokens=64, temperature=0.8, seed=3, logprobs=7),
        "s2": SamplingParams(max_tokens=64, temperature=0.0, repetition_penalty=1.5),
        "s3": SamplingParams(max_tokens=64, temperature=1.2, seed=4, logprobs=0),
    }
    runner = ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])
    runner.add("s1", prompts["s1"], others["s1"])  # "a" gets a later row than its neighbours
    runner.add("s2", prompts["s2"], others["s2"])
    runner.add("a", prompts["s0"], mine)
    runner.add("s3", prompts["s3"], others["s3"])
    everyone = ["s1", "s2", "a", "s3"]
    lengths = {"a": len(prompts["s0"])} | {name: len(prompts[name]) for name in others}
    tokens: list[int] = []
    logprobs: list[TokenLogprobs] = []
    result = runner.prefill([PrefillChunk(name, lengths[name]) for name in everyone])
    while True:
        tokens.append(chosen(result)["a"])
        logprobs.append(chosen_logprobs(result)["a"])
        assert len(chosen_logprobs(result)["s1"].top) == 7 and chosen_logprobs(result)["s3"].top == ()
        assert "s2" not in chosen_logprobs(result)
        if len(tokens) == 6:
            break
        result = runner.decode(everyone)
    assert tokens == alone[0]
    for together, by_itself in zip(logprobs, alone[1], strict=True):
        assert [token for token, _ in together.top] == [token for token, _ in by_itself.top]
        assert together.logprob == pytest.approx(by_itself.logprob, abs=1e-5)
        assert [v for _, v in together.top] == pytest.approx([v for _, v in by_itself.top], abs=1e-5)

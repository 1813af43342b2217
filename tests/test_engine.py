"""The torch layer: row cache, masks, sampling, and the runner against plain generate()."""

from __future__ import annotations

import dataclasses
import random
from typing import Any, cast

import pytest
import torch

from app.contract.sampling import SamplingParams
from app.contract.step import PrefillChunk
from app.engine.attention_masks import decode_mask, prefill_mask
from app.engine.kv_cache import RowKVCache, Segment
from app.engine.loader import ModelWeights
from app.engine.runner import BaseRunner, ModelRunner
from tests.fakes import chosen

GREEDY = SamplingParams(max_tokens=64, temperature=0.0)


def reference_greedy(weights: ModelWeights, prompt: list[int], n: int, **generate: float) -> list[int]:
    ids = torch.tensor([prompt])
    out = cast(Any, weights.model).generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        **generate,
    )
    return out[0, len(prompt) :].tolist()


def random_prompts(count: int, vocab: int, seed: int = 1) -> dict[str, list[int]]:
    rng = random.Random(seed)
    lengths = [3, 45, 9, 70, 1, 33][:count]  # some longer than the tiny model's 32-token window
    return {f"s{i}": [rng.randrange(1000, vocab - 2000) for _ in range(length)] for i, length in enumerate(lengths)}


def test_greedy_tokens_are_the_same_alone_or_batched_joining_mid_flight(tiny_weights: ModelWeights) -> None:
    n = 24
    prompts = random_prompts(6, 199_000)
    expected = {name: reference_greedy(tiny_weights, prompt, n) for name, prompt in prompts.items()}
    runner = ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])
    joins = {name: 3 * i for i, name in enumerate(prompts)}
    # Six sequences through four rows: the later ones wait for rows, so joins and leaves interleave.
    out = drive(runner, prompts, n, joins, {name: GREEDY for name in prompts}, chunk=7)
    assert out == expected
    assert runner.kv_cache_bytes == 0, "the cache is dropped when the last sequence leaves"


def drive(
    runner: BaseRunner,
    prompts: dict[str, list[int]],
    n: int,
    joins: dict[str, int],
    params: dict[str, SamplingParams],
    chunk: int,
) -> dict[str, list[int]]:
    """Run sequences through the runner: each joins at its step once a row is free, and its
    prompt is prefilled in chunks."""
    out: dict[str, list[int]] = {name: [] for name in prompts}
    waiting = sorted(prompts, key=lambda name: joins[name])
    active: list[str] = []
    step = 0
    while any(len(tokens) < n for tokens in out.values()):
        while waiting and joins[waiting[0]] <= step and runner.free_rows:
            name = waiting.pop(0)
            runner.add(name, prompts[name], params[name])
            active.append(name)
        prefilling = [s for s in active if runner.pending_prompt(s) > 0]
        if prefilling:
            result = runner.prefill([PrefillChunk(s, chunk) for s in prefilling])
        elif active:
            result = runner.decode(active)
        else:
            step += 1
            continue
        for name, token in chosen(result).items():
            out[name].append(token)
        for name in list(active):
            if len(out[name]) >= n:
                runner.release(name)
                active.remove(name)
        step += 1
        assert step < 10_000
    return out


def test_llama_architecture_matches_generate_too(smollm2_weights: ModelWeights) -> None:
    n = 12
    tokenizer = smollm2_weights.tokenizer
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived", "1, 2, 3,"]
    prompts = {f"s{i}": tokenizer.encode(t) for i, t in enumerate(texts)}
    expected = {name: reference_greedy(smollm2_weights, prompt, n) for name, prompt in prompts.items()}
    runner = ModelRunner(smollm2_weights.model, max_batch_size=4, max_context=2048, stop_token_ids=[])
    out = drive(runner, prompts, n, {"s0": 0, "s1": 2, "s2": 5}, {name: GREEDY for name in prompts}, chunk=5)
    assert out == expected


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_weights: ModelWeights) -> None:
    n = 16
    prompts = random_prompts(3, 199_000, seed=7)
    sampled = {
        name: SamplingParams(max_tokens=n, temperature=0.9, top_p=0.95, top_k=50, seed=i)
        for i, name in enumerate(prompts)
    }
    alone = {}
    for name in prompts:
        runner = ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])
        alone[name] = drive(runner, {name: prompts[name]}, n, {name: 0}, sampled, chunk=64)[name]
    runner = ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])
    together = drive(runner, prompts, n, {name: i for i, name in enumerate(prompts)}, sampled, chunk=64)
    assert together == alone
    assert len(set(map(tuple, together.values()))) == 3


def test_min_tokens_masks_stop_tokens(tiny_weights: ModelWeights) -> None:
    """The scheduler names the sequences below their min_tokens; the runner masks their stop tokens."""
    prompt = random_prompts(1, 199_000)["s0"]
    first = reference_greedy(tiny_weights, prompt, 1)[0]
    runner = ModelRunner(tiny_weights.model, max_batch_size=2, max_context=4096, stop_token_ids=[first])
    params = SamplingParams(max_tokens=4, temperature=0.0, min_tokens=2)
    runner.add("a", prompt, params)
    result = runner.prefill([PrefillChunk("a", len(prompt))], must_continue={"a"})
    assert chosen(result)["a"] != first


def test_row_cache_moves_the_last_row_into_a_freed_one() -> None:
    cache = RowKVCache(num_layers=1, max_rows=4, max_positions=16)
    cache.reserve(3, 4)
    keys = torch.arange(3 * 1 * 4 * 2, dtype=torch.float32).reshape(3, 1, 4, 2)
    cache.plan_prefill((Segment(0, 0, 4), Segment(1, 0, 4), Segment(2, 0, 4)))
    packed = keys.permute(1, 0, 2, 3).reshape(1, 1, 12, 2)
    cache.update(packed, packed, 0)
    cache.clear_plan()
    cache.move_row(2, 0, 4)
    cache.plan_decode(torch.tensor([4, 4]), 5)
    k, _ = cache.update(torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), 0)
    assert torch.equal(k[0, :, :4], keys[2]) and torch.equal(k[1, :, :4], keys[1])
    cache.release()
    assert cache.allocated_bytes == 0


def test_row_cache_refuses_more_than_its_bounds() -> None:
    cache = RowKVCache(num_layers=1, max_rows=2, max_positions=8)
    with pytest.raises(ValueError):
        cache.reserve(3, 4)
    with pytest.raises(ValueError):
        cache.reserve(1, 9)


def test_decode_mask_sliding_window_sees_the_last_w_positions() -> None:
    mask = decode_mask(torch.tensor([5, 2]), kv_length=6, window=3, dtype=torch.float32)
    visible = (mask[:, 0, 0] == 0).tolist()
    assert visible[0] == [False, False, False, True, True, True]
    assert visible[1] == [True, True, True, False, False, False]


def test_prefill_mask_keeps_packed_sequences_apart() -> None:
    mask = prefill_mask(
        [Segment(0, 0, 2), Segment(1, 1, 2)], window=None, dtype=torch.float32, device=torch.device("cpu")
    )
    visible = (mask[0, 0] == 0).int().tolist()
    # Keys: segment 0 positions 0-1, then segment 1 positions 0-2 (one cached, two new).
    assert visible == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_repetition_penalty_matches_generate_while_batched_with_unpenalised_rows(
    smollm2_weights: ModelWeights,
) -> None:
    # A real model, which repeats itself under greedy decoding (the tiny random one never does).
    texts = ["The cat sat on the mat. The cat sat on the mat. The cat", "1, 2, 3, 1, 2, 3, 1, 2,", "Once upon a time"]
    prompts = {f"s{i}": list(smollm2_weights.tokenizer(text)["input_ids"]) for i, text in enumerate(texts)}
    prompts["plain"] = prompts["s0"]  # the same prompt without the penalty, in the same batch
    n = 12
    penalised = dataclasses.replace(GREEDY, repetition_penalty=1.3)
    params = {name: GREEDY if name == "plain" else penalised for name in prompts}
    expected = {
        name: reference_greedy(smollm2_weights, prompt, n, **({} if name == "plain" else {"repetition_penalty": 1.3}))
        for name, prompt in prompts.items()
    }
    runner = ModelRunner(smollm2_weights.model, max_batch_size=4, max_context=2048, stop_token_ids=[])
    out = drive(runner, prompts, n, dict.fromkeys(prompts, 0), params, chunk=32)
    assert out == expected
    assert out["s0"] != out["plain"], "the penalty changed the answer"


def test_sequences_whose_prefill_never_ran_can_be_released(tiny_weights: ModelWeights) -> None:
    runner = ModelRunner(tiny_weights.model, max_batch_size=8, max_context=4096, stop_token_ids=[])
    runner.add("a", [1000, 2000], GREEDY)
    runner.prefill([PrefillChunk("a", 2)])  # storage for the rows so far
    for name in "bcdefg":  # joined, but their step failed before any forward
        runner.add(name, [3000], GREEDY)
    for name in "bcdef":
        runner.release(name)
    assert runner.sequence_ids() == ["a", "g"]
    runner.release("a")
    runner.release("g")
    assert runner.free_rows == 8 and runner.kv_cache_bytes == 0


def test_a_sequence_with_non_finite_logits_fails_alone(tiny_weights: ModelWeights) -> None:
    runner = ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])
    for name, prompt in (("good", [1000, 2000]), ("bad", [3000, 4000])):
        runner.add(name, prompt, GREEDY)
    runner.prefill([PrefillChunk("good", 2), PrefillChunk("bad", 2)])
    bad_row = 1  # rows follow admission order

    def poison(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[bad_row] = float("nan")  # as a broken kernel or an overflow would
        return output

    hook = tiny_weights.model.get_output_embeddings().register_forward_hook(poison)
    try:
        result = runner.decode(["good", "bad"])
    finally:
        hook.remove()
    assert set(chosen(result)) == {"good"}
    assert result.failed == {"bad": "non_finite_logits"}


def test_a_sequence_whose_sampling_fails_fails_alone(tiny_weights: ModelWeights) -> None:
    """The runner reports it as sampling_failed; its neighbours get their tokens."""
    runner = ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])
    runner.add("good", [1000, 2000], GREEDY)
    runner.add("bad", [3000, 4000], SamplingParams(max_tokens=4, temperature=1e-40, seed=1))
    result = runner.prefill([PrefillChunk("good", 2), PrefillChunk("bad", 2)])
    assert set(chosen(result)) == {"good"} and result.failed == {"bad": "sampling_failed"}

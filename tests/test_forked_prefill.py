"""Forked sequences on the real tiny gpt-oss: one prefill shared by the choices of a request.

A child added with ``fork_from`` starts from a copy of its parent's keys for all but the last
prompt token and prefills that one token itself. The tiny gpt-oss alternates full and sliding
(32-token window) attention layers, so prompts longer than the window check that the copy is
exact for both kinds.

Breakage each test catches: a copy that misses a layer kind, copies one position too few or too
many, or copies what the parent generated after its prompt (the child's tokens differ from an
unforked run); a child that prefills its whole prompt again (its prefill step's new_tokens is not
1); a copy into a row past the row cache's storage (the third sequence of a cache grown for two);
a child whose first token is not drawn from its own generator (seeded children differ from an
unforked run with the same seed).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.contract.sampling import SamplingParams
from app.contract.step import PrefillChunk
from app.engine.cuda_graphs import StepGraphs
from app.engine.loader import ModelWeights
from app.engine.runner import BaseRunner, ModelRunner
from app.engine.static_runner import StaticModelRunner
from tests.fakes import chosen
from tests.test_engine import GREEDY, random_prompts
from tools.gpu_check.frozen_capture import FrozenCapture

N = 12
SEEDED = SamplingParams(max_tokens=64, temperature=0.9, top_p=0.95, seed=11)


def dynamic_runner(weights: ModelWeights) -> BaseRunner:
    return ModelRunner(weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])


def static_runner(weights: ModelWeights) -> BaseRunner:
    # Decode steps replayed from captures (as CUDA graphs would be): they read the slots in place.
    return StaticModelRunner(
        weights.model,
        max_batch_size=4,
        max_context=512,
        stop_token_ids=[],
        graphs=StepGraphs(FrozenCapture()),
        smallest_kv_bucket=16,
    )


RUNNERS: dict[str, Callable[[ModelWeights], BaseRunner]] = {"row_cache": dynamic_runner, "slot_cache": static_runner}


def prefill(runner: BaseRunner, seq_id: str, chunk: int = 7) -> int:
    """Prefill a sequence in chunks; its first token."""
    while True:
        result = runner.prefill([PrefillChunk(seq_id, chunk)])
        if seq_id in chosen(result):
            return chosen(result)[seq_id]


def unforked(runner: BaseRunner, prompt: list[int], params: SamplingParams) -> list[int]:
    runner.add("alone", prompt, params)
    tokens = [prefill(runner, "alone")]
    while len(tokens) < N:
        tokens.append(chosen(runner.decode(["alone"]))["alone"])
    runner.release("alone")
    return tokens


@pytest.mark.parametrize("kind", RUNNERS)
@pytest.mark.parametrize("length", [45, 9, 1], ids=["past_the_window", "within_the_window", "one_token"])
def test_forked_children_prefill_one_token_and_generate_what_an_unforked_run_does(
    tiny_weights: ModelWeights, kind: str, length: int
) -> None:
    prompt = random_prompts(4, 199_000, seed=3)["s1"][:length]
    expected = unforked(RUNNERS[kind](tiny_weights), prompt, GREEDY)
    expected_seeded = unforked(RUNNERS[kind](tiny_weights), prompt, SEEDED)
    runner = RUNNERS[kind](tiny_weights)
    runner.add("parent", prompt, GREEDY)
    out: dict[str, list[int]] = {"parent": [prefill(runner, "parent")]}
    for _ in range(3):  # the parent generates past its prompt: those keys must not be copied
        out["parent"].append(chosen(runner.decode(["parent"]))["parent"])
    children = {"greedy": GREEDY, "seeded": SEEDED}
    for name, params in children.items():  # the second child's row is past a row cache grown for two
        runner.add(name, prompt, params, fork_from="parent")
        assert runner.pending_prompt(name) == 1
        result = runner.prefill([PrefillChunk(name, 64)])
        assert (result.new_tokens, result.batch) == (1, 1), "the child prefilled only its last prompt token"
        out[name] = [chosen(result)[name]]
    runner.release("parent")  # the children do not need it any more (the row cache moves a row here)
    while any(len(tokens) < N for name, tokens in out.items() if name != "parent"):
        for name, token in chosen(runner.decode(list(children))).items():
            out[name].append(token)
    assert out["greedy"] == expected
    assert out["parent"] == expected[:4]
    assert out["seeded"] == expected_seeded
    assert expected_seeded != expected


def test_a_fork_from_another_prompt_or_an_unfinished_prefill_is_refused(tiny_weights: ModelWeights) -> None:
    runner = dynamic_runner(tiny_weights)
    runner.add("parent", [1000, 1001, 1002, 1003], GREEDY)
    with pytest.raises(ValueError, match="cannot fork"):
        runner.add("early", [1000, 1001, 1002, 1003], GREEDY, fork_from="parent")
    prefill(runner, "parent")
    with pytest.raises(ValueError, match="cannot fork"):
        runner.add("other", [1000, 1001, 1002, 1004], GREEDY, fork_from="parent")
    assert runner.sequence_ids() == ["parent"]

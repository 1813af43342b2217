"""The grammar engine in the runner: compiled once per spec, one matcher per row, masks applied to
the constrained rows of a step only, a fault that fails its own row, Harmony's final channel."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr

from app.contract.grammar import GrammarError, GrammarSpec
from app.contract.sampling import SamplingParams
from app.contract.step import PrefillChunk
from app.engine import grammar as grammar_module
from app.engine.grammar import GrammarCompiler, HarmonyMarkers, SequenceGrammar
from app.engine.loader import ModelWeights, serve_weights
from app.engine.runner import BaseRunner
from app.engine.sampling import choose_tokens
from app.prompts.builder import ChatMessage, PromptSpec, build_prompt_tokens
from tests.conftest import BARE
from tests.fakes import chosen, chosen_logprobs

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["blue", "red", "green"]}, "sure": {"type": "boolean"}},
    "required": ["color", "sure"],
    "additionalProperties": False,
}
SCHEMA_SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA, sort_keys=True, separators=(",", ":")))


def chat_prompt(weights: ModelWeights, text: str) -> tuple[int, ...]:
    spec = PromptSpec(messages=(ChatMessage("user", text),))
    return build_prompt_tokens(spec, weights.tokenizer, weights.harmony)


def run_greedy(
    runner: BaseRunner, prompts: dict[str, tuple[Sequence[int], SamplingParams]], steps: int
) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Prefill every prompt in one step, then decode them together until each stops or fails."""
    for seq_id, (prompt, params) in prompts.items():
        runner.add(seq_id, prompt, params)
    out: dict[str, list[int]] = {seq_id: [] for seq_id in prompts}
    failed: dict[str, str] = {}
    result = runner.prefill([PrefillChunk(seq_id, len(prompt)) for seq_id, (prompt, _) in prompts.items()])
    live: list[str] = []
    for _ in range(steps + 1):
        failed.update(result.failed)
        for seq_id, token in chosen(result).items():
            out[seq_id].append(token)
        live = [s for s in prompts if s not in failed and (not out[s] or out[s][-1] not in runner.stop_token_ids)]
        if not live:
            break
        result = runner.decode(live)
    for seq_id in prompts:
        runner.release(seq_id)
    return out, failed


def test_a_grammar_compiles_once_and_the_cache_is_bounded(smollm2_weights: ModelWeights) -> None:
    compiler = GrammarCompiler(smollm2_weights.tokenizer, 49152, smollm2_weights.stop_token_ids, capacity=2)
    regexes = [GrammarSpec("regex", pattern) for pattern in ("a+", "b+", "c+")]
    compiler.check(regexes[0])
    compiler.check(regexes[0])
    compiler.check(GrammarSpec("regex", "a+", final_channel_only=True))  # the same grammar, elsewhere
    assert compiler.compilations == 1
    compiler.check(regexes[1])
    compiler.check(regexes[2])  # evicts a+, the least recently used
    compiler.check(regexes[2])
    assert compiler.compilations == 3
    compiler.check(regexes[0])
    assert compiler.compilations == 4


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (
            GrammarSpec("json_schema", '{"type":"objectx"}'),
            'the JSON schema cannot be used: Unsupported type "objectx"',
        ),
        # The engine's own words follow our prefix; they vary a little between its releases.
        (GrammarSpec("json_schema", '{"$ref":"#/nope"}'), "the JSON schema cannot be used: Cannot find field"),
        (
            GrammarSpec("regex", "(open"),
            "the regex cannot be used: Regex parsing error at position 6: The parenthesis is not closed.",
        ),
    ],
)
def test_what_the_engine_cannot_compile_is_a_grammar_error_in_a_sentence(
    smollm2_weights: ModelWeights, spec: GrammarSpec, reason: str
) -> None:
    compiler = GrammarCompiler(smollm2_weights.tokenizer, 49152, smollm2_weights.stop_token_ids)
    with pytest.raises(GrammarError) as caught:
        compiler.check(spec)
    assert str(caught.value).startswith(reason)
    assert spec.kind != "json_schema" or "nope" in str(caught.value) or "objectx" in str(caught.value)
    assert ".cc:" not in str(caught.value) and "/project" not in str(caught.value)  # no engine internals


def test_a_constrained_row_follows_its_schema_and_leaves_its_neighbour_alone(smollm2_weights: ModelWeights) -> None:
    """In one batch: a greedy row under a schema of enums and booleans, and a plain greedy row.
    The constrained one is valid JSON and stops by itself; the plain one's tokens are exactly
    those it gets alone (fp32 greedy is batch-invariant, so any mask leaking into it shows)."""
    loaded = serve_weights(smollm2_weights, BARE, max_batch_size=4)
    runner = loaded.runner
    ask = chat_prompt(smollm2_weights, "Is the sky blue? Answer in JSON.")
    other = chat_prompt(smollm2_weights, "Write a poem about the sea.")
    constrained = SamplingParams(max_tokens=60, temperature=0.0, grammar=SCHEMA_SPEC)
    plain = SamplingParams(max_tokens=24, temperature=0.0)
    alone, _ = run_greedy(runner, {"plain": (other, plain)}, 23)
    both, failed = run_greedy(runner, {"json": (ask, constrained), "plain": (other, plain)}, 23)
    assert not failed
    assert both["plain"] == alone["plain"]
    answer = both["json"]
    assert answer[-1] in runner.stop_token_ids  # it ended by itself, well before max_tokens
    document = json.loads(loaded.decode(answer[:-1]))
    jsonschema.validate(document, SCHEMA)
    unconstrained, _ = run_greedy(runner, {"free": (ask, plain)}, 23)
    assert unconstrained["free"] != answer  # the grammar changed what the model said


def test_a_step_without_constrained_rows_never_touches_the_grammar_engine(
    smollm2_weights: ModelWeights, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = xgr.apply_token_bitmask_inplace

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(grammar_module.xgr, "apply_token_bitmask_inplace", counted)
    loaded = serve_weights(smollm2_weights, BARE, max_batch_size=2)
    prompt = chat_prompt(smollm2_weights, "Say hi.")
    run_greedy(loaded.runner, {"plain": (prompt, SamplingParams(max_tokens=4, temperature=0.0))}, 3)
    assert calls == []
    run_greedy(loaded.runner, {"json": (prompt, SamplingParams(max_tokens=4, temperature=0.0, grammar=SCHEMA_SPEC))}, 3)
    assert calls  # the same path with a grammar does mask


class BrokenGrammar(SequenceGrammar):
    def accept(self, token: int) -> bool:
        raise RuntimeError("matcher state corrupted")


def test_a_grammar_fault_fails_its_own_row_only(smollm2_weights: ModelWeights) -> None:
    loaded = serve_weights(smollm2_weights, BARE, max_batch_size=2)
    runner = loaded.runner
    prompt = chat_prompt(smollm2_weights, "Is the sky blue? Answer in JSON.")
    runner.add("broken", prompt, SamplingParams(max_tokens=8, temperature=0.0, grammar=SCHEMA_SPEC))
    runner.add("fine", prompt, SamplingParams(max_tokens=8, temperature=0.0, grammar=SCHEMA_SPEC))
    seq = runner._seqs["broken"]
    assert isinstance(seq.grammar, SequenceGrammar)
    seq.grammar = BrokenGrammar(seq.grammar.matcher)
    result = runner.prefill([PrefillChunk("broken", len(prompt)), PrefillChunk("fine", len(prompt))])
    assert result.failed == {"broken": "grammar_failed"}
    assert set(chosen(result)) == {"fine"}
    assert loaded.decode([chosen(result)["fine"]]).startswith("{")


def test_logit_bias_moves_a_greedy_choice_both_ways() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    params = [
        SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((0, -100.0),)),
        SamplingParams(max_tokens=1, temperature=0.0, logit_bias=((3, 5.0),)),
    ]
    assert choose_tokens(logits, params, [None, None], [(), ()]) == [1, 3]
    assert logits[0, 0] == 3.0  # the model's logits are never edited


def harmony_markers(tiny_weights: ModelWeights) -> HarmonyMarkers:
    loaded = serve_weights(tiny_weights, BARE, max_batch_size=1)
    assert loaded.grammars is not None and loaded.grammars.harmony is not None
    return loaded.grammars.harmony


def test_a_harmony_grammar_waits_for_the_final_channel(tiny_weights: ModelWeights) -> None:
    from app.prompts.harmony_encoding import harmony_encoding

    encoding = harmony_encoding()
    markers = harmony_markers(tiny_weights)
    compiler = GrammarCompiler(tiny_weights.tokenizer, 201088, tiny_weights.stop_token_ids, markers)
    grammar = compiler.matcher(GrammarSpec("choice", '["yes"]', final_channel_only=True))
    thinking = "<|channel|>analysis<|message|>{not json<|end|><|start|>assistant<|channel|>final<|message|>"
    for token in encoding.encode(thinking, allowed_special="all"):
        assert not grammar.constrains
        assert grammar.accept(token)  # anything goes in the analysis
    assert grammar.constrains
    assert not grammar.accept(encoding.encode("no")[0])
    assert grammar.accept(encoding.encode("yes")[0])
    assert grammar.accept(markers.end)
    assert grammar.matcher.is_terminated()


def test_the_static_path_constrains_the_same_way(smollm2_weights: ModelWeights) -> None:
    """--cuda-graphs serves through the static runner (eager off CUDA): the same masks, the same answer."""
    prompt = chat_prompt(smollm2_weights, "Is the sky blue? Answer in JSON.")
    params = SamplingParams(max_tokens=40, temperature=0.0, grammar=SCHEMA_SPEC)
    dynamic = serve_weights(smollm2_weights, BARE, max_batch_size=2)
    static = serve_weights(smollm2_weights, replace(BARE, cuda_graphs=True, max_seq_len=256), max_batch_size=2)
    assert static.decode_path == "static"
    expected, _ = run_greedy(dynamic.runner, {"a": (prompt, params)}, 39)
    got, failed = run_greedy(static.runner, {"a": (prompt, params)}, 39)
    assert not failed and got == expected
    jsonschema.validate(json.loads(static.decode(got["a"][:-1])), SCHEMA)


def test_logprobs_stay_raw_under_logit_bias_and_a_grammar(smollm2_weights: ModelWeights) -> None:
    """The logprobs are the model's own (before logit_bias and the grammar's mask), as README says."""
    loaded = serve_weights(smollm2_weights, BARE, max_batch_size=2)
    prompt = chat_prompt(smollm2_weights, "Is the sky blue? Answer in JSON.")
    with torch.inference_mode():
        raw = torch.log_softmax(loaded.runner.model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    brace = smollm2_weights.tokenizer.encode("{")[0]
    cat = smollm2_weights.tokenizer.encode(" cat")[0]
    params = {
        "bias": SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, logit_bias=((cat, 100.0),)),
        "grammar": SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, grammar=SCHEMA_SPEC),
    }
    for seq_id, p in params.items():
        loaded.runner.add(seq_id, prompt, p)
    result = loaded.runner.prefill([PrefillChunk(seq_id, len(prompt)) for seq_id in params])
    assert chosen(result) == {"bias": cat, "grammar": brace}
    for seq_id, token in chosen(result).items():
        assert chosen_logprobs(result)[seq_id].logprob == pytest.approx(float(raw[token]), abs=1e-4)
        assert [t for t, _ in chosen_logprobs(result)[seq_id].top] == torch.topk(raw, 2).indices.tolist()

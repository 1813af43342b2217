"""Graphs vs eager: one prompt's greedy tokens from the static path with captured decode steps,
with eager ones, and from plain ``generate()``.

Replayed graphs must give eager's tokens exactly, in any dtype: both run the same kernels on the
same shapes. Against ``generate()`` (a different cache, other shapes) they must agree exactly only
in float32 (``Plan.exact``); elsewhere the agreement length is reported.
"""

from __future__ import annotations

from typing import Any

from app.engine.cuda_graphs import Capture, StepGraphs
from tools.gpu_check.baseline import greedy_generate, prompt_ids
from tools.gpu_check.capture import CaptureLog
from tools.gpu_check.plan import Plan

PROMPT_TOKENS = 40


def static_tokens(plan: Plan, model: Any, prompt: list[int], capture: Capture | None) -> tuple[list[int], StepGraphs]:
    from app.contract.sampling import SamplingParams
    from app.contract.step import PrefillChunk
    from app.engine.static_runner import StaticModelRunner

    graphs = StepGraphs(capture)
    runner = StaticModelRunner(model, max_batch_size=1, max_context=256, stop_token_ids=[], graphs=graphs)
    runner.add("check", prompt, SamplingParams(max_tokens=plan.check_tokens, temperature=0.0))
    tokens = list(runner.prefill([PrefillChunk("check", len(prompt))]).rows["check"].tokens)
    while len(tokens) < plan.check_tokens:
        tokens.extend(runner.decode(["check"]).rows["check"].tokens)
    return tokens, graphs


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The index of the first token where ``a`` and ``b`` differ; None when they are equal."""
    shorter = min(len(a), len(b))
    return next((i for i in range(shorter) if a[i] != b[i]), None if len(a) == len(b) else shorter)


def graphs_vs_eager(plan: Plan, model: Any, capture: Capture) -> dict[str, Any]:
    prompt = prompt_ids(1, PROMPT_TOKENS, seed=7)
    log = CaptureLog(capture)
    replayed, graphs = static_tokens(plan, model, prompt[0].tolist(), log)
    eager, _ = static_tokens(plan, model, prompt[0].tolist(), None)
    generated = greedy_generate(plan, model, prompt, plan.check_tokens)[0].tolist()
    vs_generate = first_difference(replayed, generated)
    return {
        "graphs": replayed,
        "eager": eager,
        "generate": generated,
        "graphs_captured": graphs.captured,
        "graph_failure": graphs.failure,
        **log.record(),
        "graphs_equal_eager": replayed == eager,
        "first_difference_from_eager": first_difference(replayed, eager),
        "agree_with_generate": len(generated) if vs_generate is None else vs_generate,
    }

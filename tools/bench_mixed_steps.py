"""Mixed steps pay: inter-token latency of running streams while long prompts arrive, mixing off and on.

    python -m tools.bench_mixed_steps                          # smollm2-135m on the CPU
    python -m tools.bench_mixed_steps --model tiny-gpt-oss --streams 2 --arrivals 2 --prompt-tokens 64
    python -m tools.bench_mixed_steps --model 20b --device cuda --streams 16 --cuda-graphs

A bare step loop (the batch policy of app/batching and a model runner, no server, no threads):
``--streams`` streams decode; every ``--arrival-every`` steps a prompt of ``--prompt-tokens``
random tokens arrives, until ``--arrivals`` have come and answered. The same workload runs twice
in one process, with mixed steps off (``step_token_budget`` 0: prefill and decode steps alternate)
and on (``--budget``), and the table gives the running streams' inter-token latency (p50, p95,
max), the arrivals' time to first token and the steps of each kind; above it, a decode-only step's
time over the streams alone, for reference. The issue's goal: p95 with mixing on under 2x that.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from actors.trip import run_trip
from app.batching.batch import Batch, Tracked
from app.config import Profile, profile_with
from app.contract.sampling import SamplingParams
from app.contract.step import PrefillChunk
from app.engine.loader import load_weights
from app.engine.runner import BaseRunner, ModelRunner
from app.engine.static_runner import StaticModelRunner
from app.models.registry import resolve


@dataclass
class PhaseFigures:
    gaps: list[float] = field(default_factory=list)  # seconds between a running stream's tokens
    ttft: list[float] = field(default_factory=list)  # each arrival's time to first token
    steps: Counter[str] = field(default_factory=Counter)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class Workload:
    def __init__(self, args: argparse.Namespace, vocab: int) -> None:
        rng = random.Random(args.seed)
        self.args = args
        self.streams = {
            f"stream{i}": tuple(rng.randrange(100, vocab - 100) for _ in range(16)) for i in range(args.streams)
        }
        self.arrivals = [
            (f"arrival{i}", tuple(rng.randrange(100, vocab - 100) for _ in range(args.prompt_tokens)))
            for i in range(args.arrivals)
        ]

    def request(self, name: str, prompt: tuple[int, ...], tokens: int) -> Tracked[None]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        return Tracked(name, prompt, params, frozenset(), time.perf_counter(), None, None)


def run_phase(runner: BaseRunner, profile: Profile, work: Workload, max_context: int) -> PhaseFigures:
    """The streams start and decode; the prompts arrive; the phase ends when the last has answered."""
    args = work.args
    batch: Batch[None] = Batch(profile, max_context)
    figures = PhaseFigures()
    for name, prompt in work.streams.items():
        batch.offer(work.request(name, prompt, 1_000_000))
    last_token: dict[str, float] = {}
    pending = list(work.arrivals)
    arrived: dict[str, float] = {}
    answered: set[str] = set()
    step = 0
    while len(answered) < len(work.arrivals):
        if pending and step >= args.warmup_steps and (step - args.warmup_steps) % args.arrival_every == 0:
            name, prompt = pending.pop(0)
            batch.offer(work.request(name, prompt, args.arrival_tokens))
            arrived[name] = time.perf_counter()
        task = batch.take_work()
        trip = run_trip(runner, task)
        batch.apply_starts(trip.started)
        if task.plan is None or trip.result is None:
            step += 1
            continue
        result = trip.result
        now = time.perf_counter()
        outcome = batch.apply_step(task.plan, result, now)
        if arrived:  # from the first arrival on: the latency the arrivals cause
            figures.steps[result.kind] += 1
        for delivery in outcome.deliveries:
            name = delivery.request.request_id
            if name in work.streams:
                if arrived and name in last_token:
                    figures.gaps.append(now - last_token[name])
                last_token[name] = now
            elif delivery.first:
                figures.ttft.append(now - arrived[name])
            if delivery.finish is not None:
                answered.add(name)
        step += 1
    for seq_id in runner.sequence_ids():  # the streams, and an arrival whose release is still due
        runner.release(seq_id)
    return figures


def decode_step_seconds(runner: BaseRunner, work: Workload, steps: int = 8) -> float:
    """A decode-only step over the streams alone: the median of ``steps``, after one to warm up."""
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for name, prompt in work.streams.items():
        runner.add(name, prompt, params)
    runner.prefill([PrefillChunk(name, len(prompt)) for name, prompt in work.streams.items()])
    names = list(work.streams)
    runner.decode(names)
    seconds = [runner.decode(names).seconds for _ in range(steps)]
    for name in names:
        runner.release(name)
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--profile", default="latency_first")
    parser.add_argument("--budget", type=int, default=None, help="the step token budget with mixing on (the profile's)")
    parser.add_argument("--streams", type=int, default=4, help="streams decoding while the prompts arrive")
    parser.add_argument("--arrivals", type=int, default=4, help="prompts that arrive")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--arrival-tokens", type=int, default=4, help="tokens each arrival asks for")
    parser.add_argument("--arrival-every", type=int, default=8, help="steps between arrivals")
    parser.add_argument("--warmup-steps", type=int, default=4, help="steps the streams decode before the first")
    parser.add_argument("--cuda-graphs", action="store_true", help="the static runner (graphs on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    weights = load_weights(resolve(args.model), dtype=args.dtype, device=args.device)
    max_context = args.prompt_tokens + 1024
    rows = args.streams + args.arrivals
    base = profile_with(args.profile, max_batch_size=rows, step_token_budget=args.budget)
    if base.step_token_budget <= args.streams:
        parser.error(f"a budget of {base.step_token_budget} leaves no room next to {args.streams} streams")
    runner: BaseRunner
    if args.cuda_graphs:
        runner = StaticModelRunner(weights.model, max_batch_size=rows, max_context=max_context, stop_token_ids=[])
        runner.capture_graphs(max_context)
    else:
        runner = ModelRunner(weights.model, max_batch_size=rows, max_context=max_context, stop_token_ids=[])
    vocab = int(weights.model.config.get_text_config().vocab_size)
    work = Workload(args, vocab)
    with torch.inference_mode():
        decode = decode_step_seconds(runner, work)
        phases = {
            "off": run_phase(runner, dataclasses.replace(base, step_token_budget=0), work, max_context),
            "on": run_phase(runner, base, work, max_context),
        }
    path = "static" if args.cuda_graphs else "dynamic"
    print(
        f"model: {args.model} ({args.dtype}, {args.device}, {path} runner); {args.streams} streams decoding; "
        f"{args.arrivals} prompts of {args.prompt_tokens} tokens, one every {args.arrival_every} steps; "
        f"prefill chunk {base.prefill_chunk_tokens}, step budget {base.step_token_budget} when mixing"
    )
    print(f"decode-only step over the {args.streams} streams: {decode * 1000:.1f} ms")
    print(
        f"{'mixing':>7} {'ITL p50 ms':>11} {'ITL p95 ms':>11} {'ITL max ms':>11} {'p95/decode':>11} "
        f"{'TTFT p50 ms':>12} {'steps (kind: count)':>24}"
    )
    for mode, figures in phases.items():
        p95 = percentile(figures.gaps, 95)
        steps = ", ".join(f"{kind}: {count}" for kind, count in sorted(figures.steps.items()))
        print(
            f"{mode:>7} {percentile(figures.gaps, 50) * 1000:>11.1f} {p95 * 1000:>11.1f} "
            f"{max(figures.gaps) * 1000:>11.1f} {p95 / decode:>10.2f}x "
            f"{statistics.median(figures.ttft) * 1000:>12.1f} {steps:>24}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

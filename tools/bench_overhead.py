"""What the server costs on top of the model: the same requests through the whole server and
through the runner in a bare step loop, in one run.

    python -m tools.bench_overhead                          # smollm2-135m, float32, CPU, 1, 4 and 8 streams
    python -m tools.bench_overhead --streams 8 --rounds 5 --prompt-tokens 128 --tokens 64
    python -m tools.bench_overhead --url http://127.0.0.1:8000   # a server already running that model

For every level, N streams start together, each with its own prompt (the same prompts on both
sides), and each generates exactly --tokens tokens (greedy, ignore_eos, never from the prompt
cache, and with the prefix KV cache off on both sides: the rounds repeat the prompts, and this
measures the layers around the model, not what a cache saves):

- server: ``python -m app`` in a subprocess (HTTP, SSE, the actors, detokenizing), N streaming
  /generate clients (tools/stream_client.py);
- bare: in this process, a ``ModelRunner`` over the same weights, driven by a loop that admits the
  N sequences and runs the steps the scheduler would run: the step policy is the scheduler's own
  (app.batching.batch.Batch, which plans every step with app.batching.plan.plan_step), under the
  same profile, each trip by the scheduler's own ``actors.trip.run_trip``, in a worker thread as
  the server's steps run. Nothing else: no event loop work, no channels, no text.

The two sides alternate round by round (the server sits idle while the bare loop runs) and each
keeps its best round, so a noisy neighbour hurts both alike. Prints tokens/s of each, their ratio
(server / bare: 1.0 means no overhead) and p50 TTFT of each (the server's from the client's send,
the bare loop's from the round's start). Exits 1 when the ratio at --bar-streams is under
--min-ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import trio

from actors.trip import run_trip
from app.batching.batch import Batch, Tracked
from app.config import PROFILES, ModelSettings, Profile
from app.contract.sampling import SamplingParams
from app.engine.loader import LoadedModel, ModelWeights, load_weights, serve_weights
from app.models.registry import resolve
from app.prompts.builder import PromptSpec, build_prompt_tokens
from tools.levels import parse_levels
from tools.server_process import app_server
from tools.stream_client import StreamTally, generate_body, stream_generate

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Prose, so that the prompts tokenize like text; each stream's prompt starts with its own number.
PASSAGE = (
    "The harbour was quiet before dawn. Fishing boats rocked against the pier, their ropes creaking, "
    "while gulls circled above the market where the first crates of the morning catch were stacked. "
    "An old sailor sat on a bollard and told anyone who would listen about the storm of his youth. "
)


@dataclass(frozen=True)
class Round:
    """One round of N streams: wall time, tokens per stream, and seconds to each first token."""

    wall: float
    tokens: tuple[int, ...]
    ttfts: tuple[float, ...]

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / self.wall if self.wall > 0 else 0.0

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttfts) if self.ttfts else float("nan")


@dataclass(frozen=True)
class Row:
    streams: int
    server: Round  # the best round of each side
    bare: Round

    @property
    def ratio(self) -> float:
        return self.server.tokens_per_s / self.bare.tokens_per_s if self.bare.tokens_per_s else 0.0


@dataclass(frozen=True)
class Workload:
    levels: tuple[int, ...]
    prompts: tuple[str, ...]  # one per stream of the largest level
    prompt_ids: tuple[tuple[int, ...], ...]  # the same prompts as the server tokenizes them
    tokens: int  # generated per stream
    rounds: int
    profile: Profile


def best(rounds: Sequence[Round]) -> Round:
    return max(rounds, key=lambda r: r.tokens_per_s)


# -- the prompts -------------------------------------------------------------------------------------
def make_prompts(weights: ModelWeights, count: int, prompt_tokens: int) -> tuple[list[str], list[tuple[int, ...]]]:
    """``count`` distinct raw prompts of about ``prompt_tokens`` tokens, and their token ids as
    /generate builds them from a raw prompt (so both sides prefill exactly the same tokens)."""
    texts, ids = [], []
    for i in range(count):
        long = f"Story {i + 1}. " + PASSAGE * (prompt_tokens // 40 + 2)
        head = weights.tokenizer.encode(long, add_special_tokens=False)[:prompt_tokens]
        text = str(weights.tokenizer.decode(head))
        texts.append(text)
        ids.append(build_prompt_tokens(PromptSpec(prompt=text), weights.tokenizer, weights.harmony))
    return texts, ids


# -- the bare loop -------------------------------------------------------------------------------------
def bare_round(model: LoadedModel, prompts: Sequence[tuple[int, ...]], tokens: int, profile: Profile) -> Round:
    """All of ``prompts`` arrive at once; the loop runs until every one has its ``tokens``."""
    runner = model.runner
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    batch: Batch[None] = Batch(profile, model.max_context)
    began = time.perf_counter()
    ids = [f"bare-{i}" for i in range(len(prompts))]
    for seq_id, prompt in zip(ids, prompts, strict=True):
        batch.offer(Tracked(seq_id, prompt, params, model.stop_token_ids, began, None, None))
    generated = dict.fromkeys(ids, 0)
    first: dict[str, float] = {}
    last = began
    while not batch.idle:
        work = batch.take_work()
        trip = run_trip(runner, work)  # the scheduler's own trip: frees, joins, the step
        batch.apply_starts(trip.started)  # as the scheduler does: a prompt from the prefix cache is partly in
        if work.plan is None or trip.result is None:
            continue
        last = time.perf_counter()
        outcome = batch.apply_step(work.plan, trip.result, last)
        if outcome.failed:
            raise RuntimeError(f"the bare loop's step failed: {outcome.failed[0][1]}")
        for delivery in outcome.deliveries:
            generated[delivery.request.request_id] += 1
            if delivery.first:
                first[delivery.request.request_id] = last - began
    return Round(last - began, tuple(generated[i] for i in ids), tuple(first[i] for i in ids if i in first))


# -- the server ------------------------------------------------------------------------------------------
async def server_round(client: httpx.AsyncClient, prompts: Sequence[str], tokens: int) -> Round:
    tallies = [StreamTally() for _ in prompts]
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for prompt, tally in zip(prompts, tallies, strict=True):
            nursery.start_soon(stream_generate, client, generate_body(prompt, tokens), tally)
    wall = time.perf_counter() - began
    failed = [t.error for t in tallies if not t.ok]
    if failed:
        raise RuntimeError(f"a server stream failed: {failed[0]}")
    return Round(wall, tuple(t.tokens for t in tallies), tuple(t.ttft for t in tallies if t.ttft is not None))


async def alternating(url: str, workload: Workload, streams: int, bare: Callable[[], Round]) -> list[Row]:
    """``rounds`` server rounds, each followed by a bare round (while the server and its clients
    wait): a neighbour's load that comes and goes hits both sides alike."""
    limits = httpx.Limits(max_connections=streams + 4)
    server_rounds, bare_rounds = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await server_round(client, workload.prompts[:streams], 4)  # warm: the connections, the first requests
        for _ in range(workload.rounds):
            server_rounds.append(await server_round(client, workload.prompts[:streams], workload.tokens))
            # In a worker thread, as the server runs its steps: thread placement is no difference.
            bare_rounds.append(await trio.to_thread.run_sync(bare))
    return [Row(streams, server, bare) for server, bare in zip(server_rounds, bare_rounds, strict=True)]


def measure(url: str, model: LoadedModel, workload: Workload, log: bool = True) -> list[Row]:
    """A row per level: the best round of each side."""
    bare_round(model, workload.prompt_ids[:1], 4, workload.profile)  # warm the bare side too
    rows = []
    for streams in workload.levels:
        prompts = workload.prompt_ids[:streams]
        bare = functools.partial(bare_round, model, prompts, workload.tokens, workload.profile)
        rounds = trio.run(alternating, url, workload, streams, bare)
        row = Row(streams, best([r.server for r in rounds]), best([r.bare for r in rounds]))
        if log:
            each = ", ".join(f"{r.ratio:.2f}x" for r in rounds)
            print(
                f"  {streams} streams: server {row.server.tokens_per_s:.1f} tok/s, "
                f"bare {row.bare.tokens_per_s:.1f} tok/s, best against best {row.ratio:.2f}x "
                f"(round by round: {each})",
                flush=True,
            )
        rows.append(row)
    return rows


def render_table(rows: Sequence[Row]) -> str:
    lines = [
        "| streams | server tok/s | bare tok/s | server / bare | server TTFT p50 ms | bare TTFT p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.streams} | {row.server.tokens_per_s:.1f} | {row.bare.tokens_per_s:.1f} | {row.ratio:.2f}x "
            f"| {row.server.ttft_p50 * 1000:.1f} | {row.bare.ttft_p50 * 1000:.1f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="an alias this project knows, or a model folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for both sides")
    parser.add_argument("--profile", default="latency_first", choices=sorted(PROFILES), help="scheduler profile")
    parser.add_argument("--streams", type=parse_levels, default=(1, 4, 8), help="comma-separated levels")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens per stream (about)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per stream")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level and side; each keeps its best")
    parser.add_argument("--bar-streams", type=int, default=8, help="the level the ratio is checked at")
    parser.add_argument("--min-ratio", type=float, default=0.9, help="server / bare tokens/s needed there")
    parser.add_argument("--url", help="a running server of the same model, instead of starting one")
    parser.add_argument("--server-args", default="", help="more arguments for python -m app, as one string")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    levels = args.streams
    profile = dataclasses.replace(
        PROFILES[args.profile], max_batch_size=max(PROFILES[args.profile].max_batch_size, *levels)
    )
    load_before = os.getloadavg()[0]
    weights = load_weights(resolve(args.model), dtype=args.dtype, device=args.device)
    model = serve_weights(weights, ModelSettings(prefix_cache_bytes=0), max_batch_size=profile.max_batch_size)
    texts, ids = make_prompts(weights, max(levels), args.prompt_tokens)
    workload = Workload(levels, tuple(texts), tuple(ids), args.tokens, args.rounds, profile)
    if args.url:
        rows = measure(args.url.rstrip("/"), model, workload)
    else:
        server_args = ["--model", args.model, "--dtype", args.dtype, "--device", args.device]
        server_args += ["--profile", args.profile, "--max-batch-size", str(profile.max_batch_size)]
        server_args += ["--prefix-cache-mb", "0"]  # as the bare loop's runner
        print("starting the server ...", flush=True)
        with app_server(*server_args, *shlex.split(args.server_args), env=OFFLINE) as url:
            rows = measure(url, model, workload)
    lengths = sorted({len(p) for p in ids})
    load = os.getloadavg()[0]
    print()
    print(
        f"{args.model} ({args.dtype}, {args.device}), {lengths[0]}-{lengths[-1]} prompt tokens, "
        f"{args.tokens} tokens per stream, greedy; best of {args.rounds} rounds; "
        f"1-minute load average {load_before:.2f} before, {load:.2f} after (a busy machine makes both noisy)"
    )
    print(render_table(rows))
    checked = [row for row in rows if row.streams == args.bar_streams]
    if not checked:
        return 0
    ratio = checked[0].ratio
    passed = ratio >= args.min_ratio
    print(
        f"server / bare at {args.bar_streams} streams: {ratio:.2f}x (needs >= {args.min_ratio}): "
        f"{'PASS' if passed else 'FAIL'}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

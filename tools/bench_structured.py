"""What a grammar costs: aggregate tokens/s of N streams without and with a json_schema, one run.

    python -m tools.bench_structured                  # starts the server on tiny-gpt-oss
    python -m tools.bench_structured --url http://host:8000 --streams 8 --tokens 128

Both phases generate exactly --tokens tokens per stream, greedy, from the same prompts: the plain
one with ignore_eos, the constrained one under a schema (an array of at least 10,000 strings)
that cannot end sooner. The phases alternate for --rounds rounds and each keeps its best round,
so a noisy neighbour on the machine hurts both alike. Exits 1 when the constrained phase is more
than --max-overhead slower.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx
import trio

from tools.server_process import app_server
from tools.stream_client import StreamTally, generate_body, stream_generate

# No answer can finish inside --tokens under this schema: every constrained stream runs to its length.
ENDLESS_LIST = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 10_000}},
    "required": ["items"],
}


def body(prompt: str, tokens: int, constrained: bool) -> dict[str, Any]:
    plain = generate_body(prompt, tokens)
    if not constrained:
        return plain
    del plain["ignore_eos"]  # the grammar says where an answer ends; here it cannot end early
    schema = {"name": "list", "schema": ENDLESS_LIST}
    return plain | {"response_format": {"type": "json_schema", "json_schema": schema}}


async def phase(url: str, streams: int, tokens: int, constrained: bool) -> tuple[float, list[StreamTally]]:
    """Aggregate tokens/s of ``streams`` concurrent streams, and their tallies."""
    results: list[StreamTally] = []
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def go(i: int) -> None:
            prompt = f"Stream {i}: list the fruits of the world."
            tally = await stream_generate(client, body(prompt, tokens, constrained), StreamTally())
            if tally.error is not None:
                raise RuntimeError(tally.error)
            results.append(tally)

        await stream_generate(client, body("warm-up", 4, constrained), StreamTally())  # compiles the grammar
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(streams):
                nursery.start_soon(go, i)
        wall = time.perf_counter() - started
    if any(r.tokens != tokens for r in results):
        raise RuntimeError(f"a stream stopped short: {[r.tokens for r in results]} tokens, {tokens} asked")
    return sum(r.tokens for r in results) / wall, results


def measure(url: str, streams: int, tokens: int, rounds: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"plain": [], "json_schema": []}
    for _ in range(rounds):
        rates["plain"].append(trio.run(phase, url, streams, tokens, False)[0])
        rates["json_schema"].append(trio.run(phase, url, streams, tokens, True)[0])
    return rates


def grammar_cost(rates: dict[str, list[float]]) -> float:
    """How much slower the constrained phase's best round is than the plain one's (0.05: 5%)."""
    plain, constrained = max(rates["plain"]), max(rates["json_schema"])
    return 1 - constrained / plain if plain else 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; without it one is started on --model")
    parser.add_argument("--model", default="tiny-gpt-oss")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-overhead", type=float, default=0.10, help="the most the grammar may cost")
    args = parser.parse_args()
    if args.url:
        rates = measure(args.url, args.streams, args.tokens, args.rounds)
        model = args.url
    else:
        with app_server("--model", args.model, "--max-batch-size", str(max(args.streams, 1))) as url:
            rates = measure(url, args.streams, args.tokens, args.rounds)
        model = args.model
    best = {name: max(values) for name, values in rates.items()}
    overhead = grammar_cost(rates)
    print(f"model: {model}; {args.streams} streams x {args.tokens} tokens, greedy; best of {args.rounds} rounds")
    print(f"{'phase':>12} {'aggregate tok/s':>16} {'rounds':>24}")
    for name, values in rates.items():
        print(f"{name:>12} {best[name]:>16.1f} {', '.join(f'{v:.1f}' for v in values):>24}")
    verdict = "PASS" if overhead <= args.max_overhead else "FAIL"
    print(f"the grammar costs {overhead * 100:.1f}% (allowed {args.max_overhead * 100:.0f}%): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

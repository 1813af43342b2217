"""Continuous batching pays: aggregate tokens/s of 1 stream, then of N concurrent streams.

    python -m tools.bench_batching                      # starts the server on tiny-gpt-oss
    python -m tools.bench_batching --url http://host:8000 --streams 8 --tokens 128

Every stream asks for the same number of tokens (ignore_eos, greedy), so the figures compare
like with like. Exits 1 when N streams give less than --min-speedup times the 1-stream figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import httpx
import trio

from tools.server_process import app_server


@dataclass(frozen=True)
class StreamResult:
    tokens: int
    ttft: float
    seconds: float


async def one_stream(client: httpx.AsyncClient, prompt: str, tokens: int) -> StreamResult:
    # cache: false, or repeats would be replayed from the prompt cache instead of generated.
    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "cache": False,
    }
    started = time.perf_counter()
    first: float | None = None
    count = 0
    received = b""
    async with client.stream("POST", "/generate", json=body) as response:
        response.raise_for_status()
        # Raw bytes, counted, not parsed line by line: the client shares the CPU with the server.
        async for chunk in response.aiter_raw():
            if first is None and b"event: token" in chunk:
                first = time.perf_counter() - started
            received += chunk
    count = received.count(b"event: token\n")
    if b"event: done" not in received:
        raise RuntimeError(f"stream ended without a done event: {received[-200:]!r}")
    return StreamResult(count, first or 0.0, time.perf_counter() - started)


async def run_phase(url: str, streams: int, tokens: int) -> tuple[float, list[StreamResult]]:
    results: list[StreamResult] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as client:
        await one_stream(client, "warm-up", 4)
        started = time.perf_counter()

        async def go(i: int) -> None:
            results.append(await one_stream(client, f"Stream {i}: tell me a long story about the sea.", tokens))

        async with trio.open_nursery() as nursery:
            for i in range(streams):
                nursery.start_soon(go, i)
        wall = time.perf_counter() - started
    return sum(r.tokens for r in results) / wall, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; without it one is started on --model")
    parser.add_argument("--model", default="tiny-gpt-oss")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--min-speedup", type=float, default=3.0)
    args = parser.parse_args()

    def measure(url: str) -> tuple[tuple[float, list[StreamResult]], tuple[float, list[StreamResult]]]:
        single = trio.run(run_phase, url, 1, args.tokens)
        many = trio.run(run_phase, url, args.streams, args.tokens)
        return single, many

    if args.url:
        (one, one_results), (many, many_results) = measure(args.url)
        model = args.url
    else:
        with app_server("--model", args.model, "--max-batch-size", str(max(args.streams, 1))) as url:
            (one, one_results), (many, many_results) = measure(url)
        model = args.model
    speedup = many / one if one else 0.0
    print(f"model: {model}; {args.tokens} tokens per stream, greedy, ignore_eos")
    print(f"{'streams':>8} {'aggregate tok/s':>16} {'per-stream tok/s':>17} {'median TTFT ms':>15}")
    for streams, rate, results in ((1, one, one_results), (args.streams, many, many_results)):
        per_stream = statistics.median(r.tokens / r.seconds for r in results)
        ttft = statistics.median(r.ttft for r in results) * 1000
        print(f"{streams:>8} {rate:>16.1f} {per_stream:>17.1f} {ttft:>15.1f}")
    verdict = "PASS" if speedup >= args.min_speedup else "FAIL"
    print(f"speedup at {args.streams} streams: {speedup:.2f}x (needs >= {args.min_speedup}x): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

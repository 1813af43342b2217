"""What slow grammar compiles cost everyone else: a plain request's latency alone, and alongside
--compiles requests whose regexes take seconds to compile (issue 24, item 5).

    python -m tools.bench_grammar_stall                  # starts the server on tiny-gpt-oss
    python -m tools.bench_grammar_stall --url http://host:8000 --compiles 5 --rounds 5

Alone: --rounds plain requests one after another (greedy, 24 tokens, cache off). Alongside: up to
--rounds more, one after another, sent once the constrained requests have had a second to reach
the server; only those sent while a compile was still unanswered count (where compiles hold the
prompt thread, the first waits for all of them and no second one is sent in time). Each run's
regexes are new to the server (a random literal ends them), so nothing is served from its grammar
cache; their repetition counts stay under the server's bound (10000), so they compile rather than
being refused up front. Prints each phase's median and their ratio, and exits 1 past --max-ratio
(the issue's bound: 1.5).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio

from tools.server_process import app_server

PLAIN = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "cache": False}
# Over gpt-oss's vocabulary [^x]{1,5000} compiles for about 8 s on an idle core.
DEFAULT_LENGTH = 5000
SETTLE_SECONDS = 1.0  # for the constrained requests to reach the server and start compiling


@dataclass(frozen=True)
class Latencies:
    alone: list[float]
    alongside: list[float]  # each sent while a compile was unanswered
    compile_statuses: list[int]  # 200, or 400 for a compile past the server's timeout

    @property
    def ratio(self) -> float:
        return statistics.median(self.alongside) / statistics.median(self.alone)


def slow_regexes(count: int, length: int) -> list[str]:
    """``count`` regexes that each compile for seconds, none equal to another or to an earlier run's."""
    run = "".join(secrets.choice("abcdefghijklmnopqrstuvw") for _ in range(8))
    return [f"[^x]{{1,{length - i}}}{run}" for i in range(count)]


async def plain_latencies(
    client: httpx.AsyncClient, rounds: int, while_: Callable[[], bool] = lambda: True
) -> list[float]:
    """Up to ``rounds`` plain requests' latencies, one after another, each sent only ``while_`` holds."""
    latencies = []
    for _ in range(rounds):
        if not while_():
            break
        started = time.perf_counter()
        response = await client.post("/v1/completions", json=PLAIN)
        if response.status_code != 200:
            raise RuntimeError(f"a plain request got {response.status_code}: {response.text[:200]}")
        latencies.append(time.perf_counter() - started)
    return latencies


async def measure(url: str, compiles: int, rounds: int, length: int = DEFAULT_LENGTH) -> Latencies:
    limits = httpx.Limits(max_connections=compiles + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await plain_latencies(client, 1)  # warm-up
        alone = await plain_latencies(client, rounds)
        statuses: list[int] = []

        async def constrained(regex: str) -> None:
            body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "guided_regex": regex}
            statuses.append((await client.post("/v1/completions", json=body)).status_code)

        async with trio.open_nursery() as nursery:
            for regex in slow_regexes(compiles, length):
                nursery.start_soon(constrained, regex)
            await trio.sleep(SETTLE_SECONDS)
            alongside = await plain_latencies(client, rounds, while_=lambda: len(statuses) < compiles)
    if not alongside:
        raise RuntimeError("every compile was over before a plain request was sent: give a longer --length")
    return Latencies(alone, alongside, statuses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; without it one is started on --model")
    parser.add_argument("--model", default="tiny-gpt-oss")
    parser.add_argument("--compiles", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="plain requests per phase")
    parser.add_argument("--length", type=int, default=DEFAULT_LENGTH, help="N in the slow regexes' [^x]{1,N}")
    parser.add_argument("--max-ratio", type=float, default=1.5, help="alongside / alone, medians")
    args = parser.parse_args()
    if args.url:
        result = trio.run(measure, args.url, args.compiles, args.rounds, args.length)
    else:
        with app_server("--model", args.model) as url:
            result = trio.run(measure, url, args.compiles, args.rounds, args.length)
    print(f"server: {args.url or args.model}; {args.compiles} compiles of [^x]{{1,~{args.length}}}")
    for name, values in (("alone", result.alone), ("alongside", result.alongside)):
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:>10}: median {statistics.median(values):.2f} s ({shown})")
    print(f"compiles answered: {sorted(result.compile_statuses)}")
    verdict = "PASS" if result.ratio <= args.max_ratio else "FAIL"
    print(f"alongside / alone: {result.ratio:.2f}x (allowed {args.max_ratio}x): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

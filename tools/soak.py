"""python -m tools.soak: resident memory over a long load, sampled every N finished requests.

The P0 plan's load (tools.p0.load: 96-word prompts, greedy, streamed, some dropped mid-answer by
the client), run for longer, with the server's RSS read from /stats at start and after every
``--every`` requests: a leak shows as a climb, a pool reserved at start-up as a flat line. Prints
a Markdown table (requests, RSS MiB, change since the start, the prefix cache's blocks). Several
``--url``s (a server before a change and after, say) are soaked one after the other, never at
once (they would share the CPU), and tabled side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import httpx
import trio

from tools.p0.load import LoadSettings, run_load
from tools.p0.server_stats import model_figures, read_stats, wait_idle

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    requests: int
    rss_bytes: int
    prefix_blocks: int


async def soak(url: str, settings: LoadSettings, every: int) -> tuple[list[Sample], int, int]:
    """The samples, and how many requests were dropped on purpose and how many failed."""
    samples: list[Sample] = []
    async with httpx.AsyncClient(base_url=url, timeout=settings.request_timeout) as client:

        async def sample(finished: int) -> None:
            figures = model_figures(await read_stats(client))
            rss = int(figures.get("memory", {}).get("rss_bytes", 0))
            samples.append(Sample(finished, rss, int(figures.get("prefix_cache", {}).get("blocks", 0))))

        await sample(0)
        pending: list[int] = []

        def on_finished(count: int) -> None:
            if count % every == 0:
                pending.append(count)

        async with trio.open_nursery() as nursery:

            async def sampler() -> None:
                while True:
                    while pending:
                        await sample(pending.pop(0))
                    await trio.sleep(0.05)

            nursery.start_soon(sampler)
            records = await run_load(client, settings, None, on_finished)
            while pending:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        await wait_idle(client)
        if settings.requests % every:
            await sample(settings.requests)
    dropped = sum(r.dropped for r in records)
    failed = sum(not r.ok and not r.dropped for r in records)
    return samples, dropped, failed


def table(soaks: list[tuple[str, list[Sample]]]) -> str:
    """One row per sample point, three columns per server: RSS, its change since the start, blocks."""
    head, rule = ["requests"], ["---"]
    for url, _ in soaks:
        head += [f"{url} RSS MiB", "since start", "prefix blocks"]
        rule += ["---"] * 3
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for index, first in enumerate(soaks[0][1]):
        cells = [str(first.requests)]
        for _, samples in soaks:
            s, start = samples[index], samples[0].rss_bytes
            cells += [f"{s.rss_bytes / MiB:.0f}", f"{(s.rss_bytes - start) / MiB:+.0f}", str(s.prefix_blocks)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__)
    parser.add_argument("--url", action="append", help="a server to soak (repeat: one after the other)")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--every", type=int, default=100, help="sample after every N finished requests")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=96)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--disconnect-share", type=float, default=1 / 3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--body-json",
        default="{}",
        help='fields added to every /generate body, e.g. \'{"guided_regex": "[a-z ]{1,400}", "logprobs": 5}\' '
        "to soak the per-request grammar matchers or logprob buffers",
    )
    args = parser.parse_args(argv)
    extra = json.loads(args.body_json)
    if not isinstance(extra, dict):
        parser.error("--body-json takes a JSON object")
    settings = LoadSettings(
        concurrency=args.concurrency,
        requests=args.requests,
        prompt_words=args.prompt_words,
        max_tokens=args.output_tokens,
        disconnect_share=args.disconnect_share,
        seed=args.seed,
        extra_body=tuple(extra.items()),
    )
    soaks, failures = [], 0
    for url in args.url or ["http://127.0.0.1:8000"]:
        samples, dropped, failed = trio.run(soak, url, settings, args.every)
        soaks.append((url, samples))
        failures += failed
        print(f"{url}: {args.requests} requests, {dropped} dropped by the client mid-stream, {failed} failed")
    print("\n" + table(soaks))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

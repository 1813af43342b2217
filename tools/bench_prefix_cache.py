"""What the prefix KV cache saves a multi-turn chat: time to first token of turns 2..N, without and
with it, in one run.

    python -m tools.bench_prefix_cache                                 # tiny-gpt-oss, both servers
    python -m tools.bench_prefix_cache --model 20b --device cuda       # the real figure
    python -m tools.bench_prefix_cache --url-off http://a:8000 --url-on http://b:8000

--conversations chats (8) of --turns turns (4) run at once, each turn waiting for the previous
one's answer, all sharing one system prompt of about --system-tokens tokens (1,000); each turn adds
a short user message and the previous answer, as a chat client sends it. Without --url-* the tool
starts the server twice on --model, once with --prefix-cache-mb 0 and once with the cache on, and
runs the same chats against each. TTFT is the server's own (``timings.ttft_ms`` of each stream's
finish chunk: arrival to first token); ``cached_tokens`` is what the usage said was reused. The
goal (issue 17): turns 2..N at least 3x faster to their first token with the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from tools.server_process import app_server

TOPICS = ("tides", "volcanoes", "bridges", "bees", "comets", "glaciers", "deserts", "rivers")


@dataclass(frozen=True, slots=True)
class Turn:
    conversation: int
    turn: int  # 1-based
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int
    answer: str = ""


def system_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of house rules (a word and its punctuation are about 1.3 tokens)."""
    rules, words = [], 0
    index = 0
    while words * 1.3 < tokens:
        rule = f"Rule {index + 1}: when the user asks about topic number {index}, answer plainly and cite sources."
        rules.append(rule)
        words += len(rule.split())
        index += 1
    return "You are a careful assistant. Follow these house rules.\n" + "\n".join(rules)


def chat_body(messages: list[dict[str, str]], model: str, tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def ask(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, float, int, int]:
    """Stream one turn: (the answer's text, TTFT in ms, prompt tokens, cached tokens)."""
    text, ttft, prompt, cached = [], None, 0, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk.get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
            if "timings" in chunk:
                ttft = chunk["timings"]["ttft_ms"]
            if usage := chunk.get("usage"):
                prompt = usage["prompt_tokens"]
                cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    if ttft is None:
        raise RuntimeError("the stream ended without a first token")
    return "".join(text), float(ttft), prompt, cached


async def conversation(
    client: httpx.AsyncClient, index: int, system: str, turns: int, tokens: int, model: str
) -> list[Turn]:
    messages = [{"role": "system", "content": system}]
    done = []
    for turn in range(1, turns + 1):
        topic = TOPICS[index % len(TOPICS)]
        messages.append({"role": "user", "content": f"Question {turn} of chat {index}: tell me about {topic}."})
        answer, ttft, prompt, cached = await ask(client, chat_body(messages, model, tokens))
        messages.append({"role": "assistant", "content": answer or "(no answer)"})
        done.append(Turn(index, turn, ttft, prompt, cached, answer))
    return done


async def phase(url: str, conversations: int, turns: int, system_tokens: int, tokens: int, model: str) -> list[Turn]:
    """Every conversation at once; all their turns."""
    system = system_prompt(system_tokens)
    results: list[Turn] = []
    limits = httpx.Limits(max_connections=conversations + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def run(index: int) -> None:
            results.extend(await conversation(client, index, system, turns, tokens, model))

        async with trio.open_nursery() as nursery:
            for index in range(conversations):
                nursery.start_soon(run, index)
    return sorted(results, key=lambda t: (t.conversation, t.turn))


@dataclass(frozen=True, slots=True)
class Summary:
    first_turn_ms: float  # p50 of turn 1
    later_turns_ms: float  # p50 of turns 2..N
    later_mean_ms: float
    prompt_tokens: float  # mean over turns 2..N
    cached_tokens: float  # mean over turns 2..N


def summarize(turns: list[Turn]) -> Summary:
    first = [t.ttft_ms for t in turns if t.turn == 1]
    later = [t for t in turns if t.turn > 1]
    if not first or not later:
        raise ValueError("a summary needs turn 1 and at least one later turn")
    return Summary(
        statistics.median(first),
        statistics.median(t.ttft_ms for t in later),
        statistics.fmean(t.ttft_ms for t in later),
        statistics.fmean(t.prompt_tokens for t in later),
        statistics.fmean(t.cached_tokens for t in later),
    )


def speedup(off: Summary, on: Summary) -> float:
    """How many times faster turns 2..N reach their first token with the cache (p50 against p50)."""
    return off.later_turns_ms / on.later_turns_ms if on.later_turns_ms > 0 else float("inf")


def table(off: Summary, on: Summary) -> str:
    rows = [
        f"{'prefix cache':>12} {'turn 1 p50 ms':>14} {'turns 2+ p50 ms':>16} {'turns 2+ mean ms':>17} "
        f"{'prompt tok':>11} {'cached tok':>11}"
    ]
    for name, s in (("off", off), ("on", on)):
        rows.append(
            f"{name:>12} {s.first_turn_ms:>14.1f} {s.later_turns_ms:>16.1f} {s.later_mean_ms:>17.1f} "
            f"{s.prompt_tokens:>11.0f} {s.cached_tokens:>11.0f}"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url-off", help="a running server with --prefix-cache-mb 0 (with --url-on)")
    parser.add_argument("--url-on", help="a running server with the prefix cache on (with --url-off)")
    parser.add_argument("--model", default="tiny-gpt-oss")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=32, help="most tokens per answer")
    parser.add_argument("--prefix-cache-mb", type=float, default=1024.0, help="the cache's size in the 'on' run")
    parser.add_argument("--goal", type=float, default=3.0, help="the speed-up of turns 2+ aimed at")
    args = parser.parse_args()
    if args.turns < 2:
        parser.error("--turns must be at least 2: turn 1 has nothing to reuse")
    workload = (args.conversations, args.turns, args.system_tokens, args.tokens)
    if bool(args.url_off) != bool(args.url_on):
        parser.error("--url-off and --url-on go together")
    if args.url_off:
        model = httpx.get(f"{args.url_on}/v1/models", timeout=30).json()["data"][0]["id"]
        off = trio.run(phase, args.url_off, *workload, model)
        on = trio.run(phase, args.url_on, *workload, model)
    else:
        model = args.model
        common = ("--model", model, "--device", args.device, "--max-batch-size", str(args.conversations))
        with app_server(*common, "--prefix-cache-mb", "0") as url:
            off = trio.run(phase, url, *workload, model)
        with app_server(*common, "--prefix-cache-mb", f"{args.prefix_cache_mb:g}") as url:
            on = trio.run(phase, url, *workload, model)
    off_summary, on_summary = summarize(off), summarize(on)
    print(
        f"model: {model}; {args.conversations} conversations x {args.turns} turns, a ~{args.system_tokens}-token "
        f"system prompt, answers of at most {args.tokens} tokens, greedy; TTFT as the server measured it"
    )
    print(table(off_summary, on_summary))
    ratio = speedup(off_summary, on_summary)
    verdict = "PASS" if ratio >= args.goal else "below the goal"
    print(
        f"turns 2+ reach their first token {ratio:.2f}x faster with the prefix cache (goal {args.goal:g}x): {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

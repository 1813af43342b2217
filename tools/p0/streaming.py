"""PR-ST01: SSE streaming, and what a server does for a client that drops its stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

import httpx
import trio

from tools.p0.results import CheckResult
from tools.p0.server_stats import completion_tokens, model_figures, read_stats, settled
from tools.p0.settings import PlanSettings

TOKEN_EVENT = b"event: token\n"


# -- PR-ST01 ---------------------------------------------------------------------------------------
def _sse_events(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        if name is not None and data is not None:
            events.append((name, data))
    return events


async def sse_streaming(client: httpx.AsyncClient, plan: PlanSettings) -> CheckResult:
    name = "SSE streaming"
    response = await client.post("/generate", json={"prompt": "Count to five.", "max_tokens": 12, "cache": False})
    if response.status_code != 200 or not response.headers.get("content-type", "").startswith("text/event-stream"):
        return CheckResult("PR-ST01", name, False, f"not an event stream: HTTP {response.status_code}")
    events = _sse_events(response.text)
    names = [n for n, _ in events]
    for n, data in events:
        try:
            json.loads(data)
        except json.JSONDecodeError:
            return CheckResult("PR-ST01", name, False, f"a {n} event's data is not one JSON object: {data[:60]!r}")
    tokens = names.count("token")
    in_order = names == ["start"] + ["token"] * tokens + ["done"]
    if not in_order or tokens == 0:
        shape = " ".join(dict.fromkeys(names)) or "nothing"
        return CheckResult("PR-ST01", name, False, f"events are not start, tokens, done: got {shape} ({len(names)})")
    before = await settled(client, plan.settle_s)
    figures_before = model_figures(before)
    streams_before = figures_before.get("active_streams", 0)
    if "completion" not in figures_before.get("tokens", {}):
        return CheckResult("PR-ST01", name, False, "/stats model_metrics has no tokens.completion")
    # Greedy and ignoring EOS: the stream cannot end on its own before the client drops it. As
    # long as the context allows (a server run with a short --max-seq-len refuses 4000 tokens).
    context = (await client.get("/health")).json().get("max_context")
    body = {
        "prompt": "Write a very long story.",
        "max_tokens": max(4, min(4000, int(context) - 64)) if context else 4000,
        "temperature": 0,
        "ignore_eos": True,
        "cache": False,
    }
    read = await _read_then_drop(client, body, tokens=2)
    if isinstance(read, str):
        return CheckResult("PR-ST01", name, False, read)
    closed_at = time.monotonic()
    cancel_seconds: float | None = None
    while cancel_seconds is None and time.monotonic() - closed_at <= plan.cancel_within_s:
        stats = await read_stats(client)
        cancelled = stats["cancelled_requests"] - before["cancelled_requests"]
        if cancelled >= 1 and model_figures(stats).get("active_streams", 0) == streams_before:
            cancel_seconds = time.monotonic() - closed_at
        else:
            await trio.sleep(0.02)
    after = await settled(client, plan.settle_s, figures_before.get("active_sequences", 0))
    generated = completion_tokens(after) - completion_tokens(before)
    extra = generated - read
    reasons = []
    if cancel_seconds is None:
        reasons.append(
            f"a dropped stream was not counted as cancelled (with active streams back to {streams_before}) "
            f"within {plan.cancel_within_s} s"
        )
    if extra > plan.tokens_after_drop_max:
        reasons.append(
            f"{extra} tokens generated after the client stopped reading (> {plan.tokens_after_drop_max}): "
            "the server kept generating for a client that was gone"
        )
    details = {"cancel_seconds": cancel_seconds, "tokens_after_drop": extra}
    if reasons:
        return CheckResult("PR-ST01", name, False, "; ".join(reasons), details)
    message = (
        f"start, {tokens} tokens, done in order; a dropped stream was cancelled in {(cancel_seconds or 0) * 1000:.0f}"
        f" ms, {extra} token{'' if extra == 1 else 's'} generated after the client stopped reading"
        f" (<= {plan.tokens_after_drop_max})"
    )
    return CheckResult("PR-ST01", name, True, message, details)


async def _read_then_drop(client: httpx.AsyncClient, body: dict[str, Any], tokens: int) -> int | str:
    """Stream ``body`` and close the connection once ``tokens`` token events are in: the number
    of token events read by then, or why the stream could not be dropped mid-answer."""
    received = b""
    # aiter_raw is one generator; httpx's text iterators nest several that aclosing cannot reach.
    async with (
        client.stream("POST", "/generate", json=body) as stream,
        aclosing(cast(AsyncGenerator[bytes, None], stream.aiter_raw())) as chunks,
    ):
        if stream.status_code != 200:
            return f"the long stream was refused: HTTP {stream.status_code}"
        async for chunk in chunks:
            received += chunk
            if received.count(TOKEN_EVENT) >= tokens:
                return received.count(TOKEN_EVENT)
            if b"event: done\n" in received or b"event: error\n" in received:
                break
    read = received.count(TOKEN_EVENT)
    return f"the long stream ended after {read} tokens, before the client could drop it"

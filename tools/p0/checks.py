"""The five P0 checks. Each takes an httpx client on the server and returns one CheckResult."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import percentile
from tools.p0.load import LoadSettings, Progress, run_load
from tools.p0.results import CheckResult

MiB = 1024 * 1024
TOKEN_EVENT = b"event: token\n"


@dataclass(frozen=True, slots=True)
class PlanSettings:
    """The knobs of the plan; the defaults fit a few minutes on smollm2-135m on a CPU."""

    hit_rate_min: float = 0.30
    determinism_prompts: int = 10  # distinct seeded greedy requests, each sent determinism_rounds times
    determinism_rounds: int = 3
    cancel_within_s: float = 1.0
    # Tokens the server may generate for a dropped stream beyond those its client read: the step
    # in flight when the disconnect arrives, and one more for a disconnect that lands just after
    # the next step was planned.
    tokens_after_drop_max: int = 2
    settle_s: float = 5.0  # how long a dropped stream's sequence may take to leave the batch
    perf: LoadSettings = field(default_factory=LoadSettings)
    perf_profile: str = "latency_first"
    ttft_p95_max_s: float = 7.0
    e2e_p95_max_s: float = 20.0
    error_rate_max: float = 0.005
    load: LoadSettings = field(
        default_factory=lambda: LoadSettings(concurrency=8, requests=120, max_tokens=32, disconnect_share=0.25, seed=1)
    )
    warmup_share: float = 0.2  # the first part of the load run that may grow memory freely
    growth_max_mib_per_100: float = 32.0
    sample_every_s: float = 0.25
    progress: bool = True


async def _stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/stats")
    response.raise_for_status()
    return cast(dict[str, Any], response.json())


def _model_figures(stats: dict[str, Any]) -> dict[str, Any]:
    metrics = stats.get("model_metrics") or {}
    return cast(dict[str, Any], next(iter(metrics.values()))) if metrics else {}


# -- PR-PF01 ---------------------------------------------------------------------------------------
async def prompt_determinism(client: httpx.AsyncClient, plan: PlanSettings) -> CheckResult:
    name = "Prompt determinism"
    first = {
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 8,
        "temperature": 0,
        "seed": 7,
        "stream": False,
    }
    reordered = dict(reversed(list(first.items())))  # same request, keys in another order
    a = await client.post("/generate", json=first)
    b = await client.post("/generate", content=json.dumps(reordered), headers={"Content-Type": "application/json"})
    if a.status_code != 200 or b.status_code != 200:
        return CheckResult("PR-PF01", name, False, f"generation failed: HTTP {a.status_code} / {b.status_code}")
    key_a, key_b = a.headers.get("X-Cache-Key"), b.headers.get("X-Cache-Key")
    if not key_a or key_a != key_b or a.json().get("cache_key") != key_a:
        return CheckResult("PR-PF01", name, False, f"cache_key differs for the same input: {key_a} vs {key_b}")
    version = a.headers.get("X-Prompt-Version")
    if not version or a.json().get("prompt_version") != version:
        return CheckResult("PR-PF01", name, False, "the response metadata does not carry prompt_version")
    hits = total = 0
    outputs: dict[int, set[str]] = {}
    stamp = time.time_ns()  # fresh prompts: earlier runs must not have warmed the cache
    for _round in range(plan.determinism_rounds):
        for i in range(plan.determinism_prompts):
            body = {
                "prompt": f"P0 determinism {stamp} #{i}:",
                "max_tokens": 8,
                "temperature": 0,
                "seed": 1234,
                "stream": False,
            }
            response = await client.post("/generate", json=body)
            if response.status_code != 200:
                return CheckResult("PR-PF01", name, False, f"repeat request failed: HTTP {response.status_code}")
            total += 1
            hits += response.headers.get("X-Cache") == "HIT"
            outputs.setdefault(i, set()).add(response.json()["text"])
    rate = hits / total
    if any(len(texts) != 1 for texts in outputs.values()):
        return CheckResult("PR-PF01", name, False, "repeats of a deterministic request gave different outputs")
    passed = rate >= plan.hit_rate_min
    message = f"cache_key stable ({key_a[:12]}...), prompt_version {version}, hit rate {rate:.0%} over {total}"
    return CheckResult(
        "PR-PF01",
        name,
        passed,
        message + ("" if passed else f" (< {plan.hit_rate_min:.0%})"),
        {"hit_rate": rate, "cache_key": key_a, "prompt_version": version},
    )


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
    before = await _settled(client, plan.settle_s)
    figures_before = _model_figures(before)
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
        stats = await _stats(client)
        cancelled = stats["cancelled_requests"] - before["cancelled_requests"]
        if cancelled >= 1 and _model_figures(stats).get("active_streams", 0) == streams_before:
            cancel_seconds = time.monotonic() - closed_at
        else:
            await trio.sleep(0.02)
    after = await _settled(client, plan.settle_s, figures_before.get("active_sequences", 0))
    generated = _completion_tokens(after) - _completion_tokens(before)
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


def _completion_tokens(stats: dict[str, Any]) -> int:
    return int(_model_figures(stats).get("tokens", {}).get("completion", 0))


async def _settled(client: httpx.AsyncClient, timeout: float, sequences: int = 0) -> dict[str, Any]:
    """Stats once at most ``sequences`` sequences run and the completion count holds still over
    two reads (the metrics are counted by an actor of their own, a moment after the step), or
    the last stats read after ``timeout``."""
    stats = await _stats(client)
    with trio.move_on_after(timeout):
        while True:
            await trio.sleep(0.05)
            again = await _stats(client)
            still = _completion_tokens(again) == _completion_tokens(stats)
            stats = again
            if still and _model_figures(stats).get("active_sequences", 0) <= sequences:
                return stats
    return stats


# -- PR-OBS01 --------------------------------------------------------------------------------------
async def model_tagging(client: httpx.AsyncClient, plan: PlanSettings) -> CheckResult:
    name = "Model tagging"
    health = (await client.get("/health")).json()
    missing = [f for f in ("model_id", "model_size", "dtype") if not health.get(f)]
    if missing:
        return CheckResult("PR-OBS01", name, False, f"/health lacks {', '.join(missing)}")
    model = health["model_id"]
    stats = await _stats(client)
    if model not in (stats.get("model_metrics") or {}):
        return CheckResult("PR-OBS01", name, False, f"/stats has no model_metrics for {model}")
    text = (await client.get("/metrics")).text
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as error:
        return CheckResult("PR-OBS01", name, False, f"/metrics is not Prometheus text: {error}")
    ours = [s for f in families if f.name.startswith("gptoss_") for s in f.samples]
    unlabelled = sorted({s.name for s in ours if s.labels.get("model") != model})
    if not ours or unlabelled:
        return CheckResult(
            "PR-OBS01", name, False, f"series without model={model}: {', '.join(unlabelled[:3]) or 'none at all'}"
        )
    message = f"{model} ({health['model_size']}, {health['dtype']}); {len(ours)} gptoss_ samples all labelled"
    return CheckResult("PR-OBS01", name, True, message)


# -- PR-PERF01 -------------------------------------------------------------------------------------
async def performance(client: httpx.AsyncClient, plan: PlanSettings) -> CheckResult:
    name = "Performance (latency_first)"
    health = (await client.get("/health")).json()
    progress = Progress("PR-PERF01", plan.perf.requests) if plan.progress else None
    started = time.monotonic()
    records = await run_load(client, plan.perf, progress)
    wall = time.monotonic() - started
    ttfts = [r.ttft for r in records if r.ok and r.ttft is not None]
    e2es = [r.e2e for r in records if r.ok and r.e2e is not None]
    errors = sum(not r.ok for r in records)
    error_rate = errors / max(1, len(records))
    ttft95, e2e95 = percentile(ttfts, 95), percentile(e2es, 95)
    tokens = sum(r.tokens for r in records)
    settings = plan.perf
    message = (
        f"p95 TTFT {_s(ttft95)} (<= {plan.ttft_p95_max_s} s), p95 E2E {_s(e2e95)} (<= {plan.e2e_p95_max_s} s), "
        f"errors {error_rate:.1%} (< {plan.error_rate_max:.1%}); {len(records)} requests x {settings.max_tokens} "
        f"tokens at concurrency {settings.concurrency}, {tokens / wall:.1f} tok/s"
    )
    reasons = []
    if health.get("profile") != plan.perf_profile:
        reasons.append(f"the server runs profile {health.get('profile')}, not {plan.perf_profile}")
    if ttft95 is None or ttft95 > plan.ttft_p95_max_s:
        reasons.append("p95 TTFT over the bound")
    if e2e95 is None or e2e95 > plan.e2e_p95_max_s:
        reasons.append("p95 E2E over the bound")
    if error_rate >= plan.error_rate_max:
        first_error = next((r.error for r in records if r.error), "")
        reasons.append(f"error rate over the bound ({first_error})")
    details = {"ttft_p95_s": ttft95, "e2e_p95_s": e2e95, "error_rate": error_rate, "tokens_per_s": tokens / wall}
    return CheckResult(
        "PR-PERF01", name, not reasons, message + ("; " + "; ".join(reasons) if reasons else ""), details
    )


def _s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


# -- PR-LOAD01 -------------------------------------------------------------------------------------
async def load_and_memory(client: httpx.AsyncClient, plan: PlanSettings) -> CheckResult:
    name = "Load and memory"
    settings = plan.load
    samples: list[tuple[int, int, int]] = []  # (requests finished, rss bytes, gpu allocated bytes)
    finished = 0

    def on_finished(count: int) -> None:
        nonlocal finished
        finished = count

    async def sample_memory(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            memory = _model_figures(await _stats(client)).get("memory", {})
            samples.append((finished, int(memory.get("rss_bytes", 0)), int(memory.get("gpu_allocated_bytes", 0))))
            await trio.sleep(plan.sample_every_s)

    progress = Progress("PR-LOAD01", settings.requests) if plan.progress else None
    async with trio.open_nursery() as nursery:
        await nursery.start(sample_memory)
        records = await run_load(client, settings, progress, on_finished)
        nursery.cancel_scope.cancel()
    after = await _wait_idle(client)
    samples.append((settings.requests, *_memory_of(after)))
    warm = int(settings.requests * plan.warmup_share)
    warm_samples = [s for s in samples if s[0] >= warm]
    if len(warm_samples) < 2:
        return CheckResult("PR-LOAD01", name, False, "too few memory samples after warm-up: lengthen the run")
    first, last = warm_samples[0], warm_samples[-1]
    per_100 = (last[1] - first[1]) / MiB * 100 / max(1, last[0] - first[0])
    gpu_per_100 = (last[2] - first[2]) / MiB * 100 / max(1, last[0] - first[0])
    dropped = sum(r.dropped for r in records)
    failed = [r for r in records if not r.ok and not r.dropped]
    idle = _model_figures(after)
    reasons = []
    if per_100 > plan.growth_max_mib_per_100:
        reasons.append(f"RSS grows over {plan.growth_max_mib_per_100} MiB per 100 requests")
    if gpu_per_100 > plan.growth_max_mib_per_100:
        reasons.append("GPU memory keeps growing")
    if failed:
        reasons.append(f"{len(failed)} requests failed ({failed[0].error})")
    if idle.get("active_sequences", 0) or idle.get("active_streams", 0):
        reasons.append("sequences or streams left running after the load")
    message = (
        f"{settings.requests} requests at concurrency {settings.concurrency}, {dropped} dropped mid-stream; RSS "
        f"{first[1] / MiB:.0f} -> {last[1] / MiB:.0f} MiB after warm-up, {per_100:+.1f} MiB per 100 requests "
        f"(<= {plan.growth_max_mib_per_100})"
    )
    if any(s[2] for s in samples):
        message += f", GPU {gpu_per_100:+.1f} MiB per 100"
    details = {"rss_growth_mib_per_100": per_100, "gpu_growth_mib_per_100": gpu_per_100, "samples": len(samples)}
    return CheckResult(
        "PR-LOAD01", name, not reasons, message + ("; " + "; ".join(reasons) if reasons else ""), details
    )


def _memory_of(stats: dict[str, Any]) -> tuple[int, int]:
    memory = _model_figures(stats).get("memory", {})
    return int(memory.get("rss_bytes", 0)), int(memory.get("gpu_allocated_bytes", 0))


async def _wait_idle(client: httpx.AsyncClient, timeout: float = 10.0) -> dict[str, Any]:
    """Stats once the dropped streams' teardown is done (or after ``timeout``)."""
    with trio.move_on_after(timeout):
        while True:
            stats = await _stats(client)
            figures = _model_figures(stats)
            if not figures.get("active_sequences") and not figures.get("active_streams"):
                return stats
            await trio.sleep(0.05)
    return await _stats(client)


Check = Callable[[httpx.AsyncClient, PlanSettings], Awaitable[CheckResult]]
CHECKS: dict[str, Check] = {
    "PR-PF01": prompt_determinism,
    "PR-ST01": sse_streaming,
    "PR-OBS01": model_tagging,
    "PR-PERF01": performance,
    "PR-LOAD01": load_and_memory,
}

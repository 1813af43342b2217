"""PR-PERF01 and PR-LOAD01: latency under load, and memory over a long run with dropped streams."""

from __future__ import annotations

import time

import httpx
import trio

from actors.metrics import percentile
from tools.p0.load import Progress, run_load
from tools.p0.results import CheckResult
from tools.p0.server_stats import memory_of, model_figures, read_stats, wait_idle
from tools.p0.settings import PlanSettings

MiB = 1024 * 1024


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
            samples.append((finished, *memory_of(await read_stats(client))))
            await trio.sleep(plan.sample_every_s)

    progress = Progress("PR-LOAD01", settings.requests) if plan.progress else None
    async with trio.open_nursery() as nursery:
        await nursery.start(sample_memory)
        records = await run_load(client, settings, progress, on_finished)
        nursery.cancel_scope.cancel()
    after = await wait_idle(client)
    samples.append((settings.requests, *memory_of(after)))
    warm = int(settings.requests * plan.warmup_share)
    warm_samples = [s for s in samples if s[0] >= warm]
    if len(warm_samples) < 2:
        return CheckResult("PR-LOAD01", name, False, "too few memory samples after warm-up: lengthen the run")
    first, last = warm_samples[0], warm_samples[-1]
    per_100 = (last[1] - first[1]) / MiB * 100 / max(1, last[0] - first[0])
    gpu_per_100 = (last[2] - first[2]) / MiB * 100 / max(1, last[0] - first[0])
    dropped = sum(r.dropped for r in records)
    failed = [r for r in records if not r.ok and not r.dropped]
    idle = model_figures(after)
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

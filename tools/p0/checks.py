"""The five P0 checks, by id. Each takes an httpx client on the server and returns one CheckResult:
PR-PF01 and PR-OBS01 here, PR-ST01 in streaming.py, PR-PERF01 and PR-LOAD01 in load_checks.py."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tools.p0.load_checks import load_and_memory, performance
from tools.p0.results import CheckResult
from tools.p0.server_stats import read_stats
from tools.p0.settings import PlanSettings
from tools.p0.streaming import sse_streaming


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


# -- PR-OBS01 --------------------------------------------------------------------------------------
async def model_tagging(client: httpx.AsyncClient, plan: PlanSettings) -> CheckResult:
    name = "Model tagging"
    health = (await client.get("/health")).json()
    missing = [f for f in ("model_id", "model_size", "dtype") if not health.get(f)]
    if missing:
        return CheckResult("PR-OBS01", name, False, f"/health lacks {', '.join(missing)}")
    model = health["model_id"]
    stats = await read_stats(client)
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


Check = Callable[[httpx.AsyncClient, PlanSettings], Awaitable[CheckResult]]
CHECKS: dict[str, Check] = {
    "PR-PF01": prompt_determinism,
    "PR-ST01": sse_streaming,
    "PR-OBS01": model_tagging,
    "PR-PERF01": performance,
    "PR-LOAD01": load_and_memory,
}

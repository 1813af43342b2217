"""The P0 test plan runner against an in-process server: all five pass on a sound server, and a
deliberately broken one fails the right test."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from app.engine.loader import ModelWeights
from tests.conftest import running_server
from tools.p0 import __main__ as p0_cli
from tools.p0.checks import PlanSettings
from tools.p0.load import LoadSettings
from tools.p0.runner import run_plan

FAST = PlanSettings(
    perf=LoadSettings(concurrency=4, requests=12, prompt_words=16, max_tokens=8),
    load=LoadSettings(concurrency=6, requests=60, prompt_words=8, max_tokens=8, disconnect_share=0.3, seed=3),
    sample_every_s=0.05,
    progress=False,
)


async def test_all_five_pass_on_a_sound_server(tiny_weights: ModelWeights, tmp_path: Path) -> None:
    record = tmp_path / "p0.md"
    async with running_server(tiny_weights) as server:
        run = await run_plan(server.url, plan=FAST, record_path=record, notes=["in-process test run"])
    verdicts = {r.check_id: (r.verdict, r.message) for r in run.results}
    assert list(verdicts) == ["PR-PF01", "PR-ST01", "PR-OBS01", "PR-PERF01", "PR-LOAD01"]
    assert all(verdict == "PASS" for verdict, _ in verdicts.values()), verdicts
    assert "hit rate 67%" in verdicts["PR-PF01"][1]
    text = record.read_text()
    assert "5 of 5 passed" in text and "PyTorch 2." in text and "NumPy" in text and "in-process test run" in text
    assert "| PR-ST01 | SSE streaming | PASS |" in text


def drop_done_events(app: Any) -> Any:
    """A broken server: its SSE streams never send the done event."""

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        async def filtered_send(message: Any) -> None:
            if message["type"] == "http.response.body" and message.get("body", b"").startswith(b"event: done"):
                return
            await send(message)

        await app(scope, receive, filtered_send)

    return broken


async def test_a_server_that_drops_done_fails_the_streaming_test(tiny_weights: ModelWeights) -> None:
    async with running_server(tiny_weights, wrap_asgi=drop_done_events) as server:
        run = await run_plan(server.url, only=["PR-PF01", "PR-ST01", "PR-OBS01"], plan=FAST)
    verdicts = {r.check_id: r for r in run.results}
    assert verdicts["PR-ST01"].verdict == "FAIL" and "start, tokens, done" in verdicts["PR-ST01"].message
    assert verdicts["PR-PF01"].verdict == "PASS" and verdicts["PR-OBS01"].verdict == "PASS"
    assert not run.passed


async def test_tight_bounds_fail_the_performance_test(tiny_weights: ModelWeights) -> None:
    impossible = dataclasses.replace(FAST, ttft_p95_max_s=0.0)
    async with running_server(tiny_weights) as server:
        run = await run_plan(server.url, only=["PR-PERF01"], plan=impossible)
    (result,) = run.results
    assert result.verdict == "FAIL" and "p95 TTFT over the bound" in result.message


def test_the_command_line_takes_every_knob() -> None:
    args = p0_cli.build_parser().parse_args(
        [
            "--url",
            "http://x:1",
            "--only",
            "PR-ST01",
            "--concurrency",
            "3",
            "--requests",
            "9",
            "--output-tokens",
            "7",
            "--load-requests",
            "50",
            "--disconnect-share",
            "0.5",
            "--max-growth",
            "10",
            "--no-progress",
        ]
    )
    plan = p0_cli.plan_from_args(args)
    assert (plan.perf.concurrency, plan.perf.requests, plan.perf.max_tokens) == (3, 9, 7)
    assert (plan.load.requests, plan.load.disconnect_share, plan.growth_max_mib_per_100) == (50, 0.5, 10.0)
    assert args.only == ["PR-ST01"] and not plan.progress

"""/health, /stats, /metrics, the request log and tools/logstats.py, after known sequences of requests."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import MetricsActor
from actors.metrics_events import RequestOutcome
from app.engine.loader import ModelWeights
from app.logging_setup import configure_logging
from app.prompts.harmony_encoding import harmony_encoding
from tests.conftest import RunningServer, running_server, stream_then_drop, wait_for_stats
from tests.fakes import with_faults
from tools import logstats

FAIL_PROMPT = "FAILNOW"


def fault_hook() -> Any:
    marker = harmony_encoding().encode(FAIL_PROMPT, allowed_special="all")
    return with_faults(marker, lambda: RuntimeError("injected step fault"))


async def known_sequence(server: RunningServer, client: httpx.AsyncClient) -> None:
    """Three ok (one of them from the cache), one failed, one cancelled by its client."""
    greedy = {"prompt": "alpha", "max_tokens": 5, "temperature": 0, "stream": False}
    assert (await client.post("/generate", json=greedy)).headers["X-Cache"] == "MISS"
    assert (await client.post("/generate", json=greedy)).headers["X-Cache"] == "HIT"
    sampled = {"prompt": "beta", "max_tokens": 5, "temperature": 0.5, "stream": False}
    assert (await client.post("/generate", json=sampled)).status_code == 200
    failed = await client.post("/generate", json={"prompt": FAIL_PROMPT, "max_tokens": 5, "stream": False})
    error = failed.json()["error"]
    assert failed.status_code == 500 and error["code"] == "step_failed"
    assert "injected" not in error["message"], "the exception's text stays in the log"
    assert await stream_then_drop(client, {"prompt": "gamma", "max_tokens": 5000}, 2) == 2
    await wait_for_stats(client, one_cancelled_none_running, server=server)


def one_cancelled_none_running(stats: dict[str, Any]) -> bool:
    figures = stats["model_metrics"]["tiny-gpt-oss"]
    # The teardown is recorded once the cancelled row is freed, just after the cancellation is counted.
    freed = figures["cancel_teardown_steps"]["count"] == 1
    return bool(figures["requests"]["cancelled"] == 1 and figures["active_sequences"] == 0 and freed)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matching = [v for lab, v in found.get(name, []) if all(lab.get(k) == want for k, want in labels.items())]
    assert len(matching) == 1, (name, labels, found.get(name))
    return matching[0]


async def test_metrics_follow_a_known_sequence_of_requests(tiny_weights: ModelWeights) -> None:
    async with running_server(tiny_weights, runner_hook=fault_hook()) as server, server.client() as client:
        before = samples((await client.get("/metrics")).text)
        assert value(before, "gptoss_requests_total", status="ok") == 0
        await known_sequence(server, client)
        response = await client.get("/metrics")
        stats = (await client.get("/stats")).json()["model_metrics"]["tiny-gpt-oss"]
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    for name, entries in found.items():
        if name.startswith("gptoss_"):
            assert all(lab.get("model") == "tiny-gpt-oss" and lab.get("model_size") == "13m" for lab, _ in entries), (
                name
            )
    assert value(found, "gptoss_requests_total", status="ok") == 3
    assert value(found, "gptoss_requests_total", status="error") == 1
    assert value(found, "gptoss_requests_total", status="cancelled") == 1
    assert value(found, "gptoss_requests_total", status="rejected") == 0
    assert value(found, "gptoss_cache_hits_total") == 1 and value(found, "gptoss_cache_misses_total") == 1
    assert value(found, "gptoss_client_disconnects_total") == 1
    assert value(found, "gptoss_time_to_first_token_seconds_count") == 3
    assert value(found, "gptoss_e2e_request_latency_seconds_count") == 3
    assert value(found, "gptoss_request_queue_time_seconds_count") == 4  # the generations: not the cache hit
    assert value(found, "gptoss_cancel_teardown_seconds_count") == 1
    assert value(found, "gptoss_cancel_teardown_steps_count") == 1
    assert value(found, "gptoss_inter_token_latency_seconds_count") > 0
    assert value(found, "gptoss_requests_running") == 0 and value(found, "gptoss_requests_waiting") == 0
    generated = value(found, "gptoss_generation_tokens_total")
    assert generated == stats["tokens"]["completion"] and generated >= 5 + 5 + 2
    assert value(found, "gptoss_prompt_tokens_total") == stats["tokens"]["prompt"] > 0
    assert value(found, "gptoss_model_info", dtype="float32", device="cpu", profile="latency_first") == 1
    assert value(found, "process_resident_memory_bytes") > 0
    # /stats tells the same story.
    assert stats["requests"] == {"total": 5, "ok": 3, "error": 1, "cancelled": 1, "cached": 1, "rejected": 0}
    assert stats["error_rate"] == 0.2 and stats["cache_hit_rate"] == 0.5


async def test_stats_fields_and_types(tiny_server: RunningServer) -> None:
    async with tiny_server.client() as client:
        await client.post("/generate", json={"prompt": "x", "max_tokens": 3, "stream": False})
        body = (await client.get("/stats")).json()
    figures = body["model_metrics"]["tiny-gpt-oss"]
    assert set(figures["requests"]) == {"total", "ok", "error", "cancelled", "cached", "rejected"}
    for name in ("ttft_ms", "e2e_ms", "inter_token_latency_ms", "queue_time_ms"):
        assert set(figures[name]) == {"p50", "p95", "p99"}
        assert all(isinstance(v, float) for v in figures[name].values()), name
    assert isinstance(figures["window_seconds"], float) and figures["window_seconds"] > 0
    assert isinstance(figures["generation_tokens_per_second"], float)
    assert figures["error_rate"] == 0.0 and isinstance(figures["cache_hit_rate"], float)
    assert figures["active_streams"] == 0 and figures["queue_depth"] == 0
    assert figures["memory"]["rss_bytes"] > 10_000_000
    assert figures["cache"]["enabled"] is True
    assert body["active_sequences"] == 0 and body["cancelled_requests"] == 0


async def test_health_is_503_while_loading(tiny_weights: ModelWeights) -> None:
    loaded = threading.Event()
    async with (
        running_server(tiny_weights, wait_for_model=False, before_load=lambda: loaded.wait(30)) as server,
        server.client() as client,
    ):
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        refused = await client.post("/generate", json={"prompt": "x", "max_tokens": 2, "stream": False})
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        loaded.set()
        with trio.fail_after(30):
            while (await client.get("/health")).status_code != 200:
                await trio.sleep(0.05)
        body = (await client.get("/health")).json()
    assert body["status"] == "ok" and body["uptime_s"] > 0 and isinstance(body["version"], str)


@contextlib.contextmanager
def json_log(stream: Any) -> Iterator[None]:
    configure_logging("info", "json", stream=stream)
    try:
        yield
    finally:
        configure_logging("warning", "console")


async def test_one_requests_log_lines_in_order(tiny_weights: ModelWeights) -> None:
    captured = io.StringIO()
    with json_log(captured):
        async with running_server(tiny_weights) as server, server.client() as client:
            response = await client.post(
                "/generate",
                json={"prompt": "log me", "max_tokens": 3, "temperature": 0, "stream": False},
                headers={"X-Request-Id": "log-test-1"},
            )
            await trio.sleep(0.2)  # the metrics actor writes the lines as it takes the events
    assert response.headers["X-Request-Id"] == "log-test-1"
    assert "ttft;dur=" in response.headers["Server-Timing"] and "e2e;dur=" in response.headers["Server-Timing"]
    lines = [json.loads(line) for line in captured.getvalue().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "log-test-1"]
    assert [line["event"] for line in mine] == ["received", "queued", "admitted", "first_token", "finished"]
    for line in mine:
        assert line["model"] == "tiny-gpt-oss" and line["level"] == "info" and line["timestamp"]
        assert line["cache_key"] == response.headers["X-Cache-Key"] and line["prompt_version"] == "pb-1"
    finished = mine[-1]
    assert finished["finish_reason"] == "length" and finished["completion_tokens"] == 3 and finished["e2e_ms"] > 0
    assert mine[2]["queue_ms"] >= 0 and mine[3]["ttft_ms"] > 0
    access = [line for line in lines if line.get("logger") == "hypercorn.access"]
    assert any("POST /generate" in line["event"] for line in access), "hypercorn's access log is JSON too"


async def test_logstats_reads_a_log_the_server_wrote(tiny_weights: ModelWeights, tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    with log_file.open("w") as stream, json_log(stream):
        async with running_server(tiny_weights, runner_hook=fault_hook()) as server, server.client() as client:
            await known_sequence(server, client)
            await trio.sleep(0.2)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert logstats.main([str(log_file), "--json"]) == 0
    figures = json.loads(output.getvalue())["tiny-gpt-oss"]
    assert figures["requests"] == {"finished": 3, "cached": 1, "cancelled": 1, "failed": 1, "rejected": 0}
    assert figures["ttft_ms"]["p50"] > 0 and figures["e2e_ms"]["p95"] >= figures["e2e_ms"]["p50"] > 0
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        logstats.main([str(log_file)])
    assert "tiny-gpt-oss" in table.getvalue() and "TTFT p95" in table.getvalue()


async def test_an_event_the_metrics_cannot_record_is_logged_and_the_actor_goes_on() -> None:
    actor = MetricsActor()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        actor.report(RequestOutcome("r1", "bogus", "stop", False, 1))  # type: ignore[arg-type]
        actor.report(RequestOutcome("r2", "ok", "stop", False, 1))
        with trio.fail_after(5):
            while actor.book.requests["ok"] != 1:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert actor.book.requests["ok"] == 1

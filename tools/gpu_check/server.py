"""This server over HTTP: the real app on Hypercorn (port 0) over the same weights, in this process."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any

import httpx
import trio

from actors.metrics import percentile
from app.engine.cuda_graphs import Capture
from tools.gpu_check.capture import CaptureLog
from tools.gpu_check.plan import Plan
from tools.gpu_check.report import Report
from tools.stream_client import StreamTally, generate_body, stream_generate


async def one_stream(client: httpx.AsyncClient, prompt: str, tokens: int, tally: StreamTally) -> None:
    await stream_generate(client, generate_body(prompt, tokens), tally)
    if tally.error is not None:
        raise RuntimeError(tally.error)


async def stream_phase(url: str, prompts: list[str], tokens: int, limit: float) -> dict[str, Any]:
    """All streams at once; figures from what arrived, also when the time limit cuts it short."""
    tallies = [StreamTally() for _ in prompts]
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        began = time.perf_counter()
        with trio.move_on_after(limit) as scope:
            async with trio.open_nursery() as nursery:
                for prompt, tally in zip(prompts, tallies, strict=True):
                    nursery.start_soon(one_stream, client, prompt, tokens, tally)
        wall = time.perf_counter() - began
    total = sum(t.tokens for t in tallies)
    decode_rates = [
        (t.tokens - 1) / (t.seconds - t.ttft)
        for t in tallies
        if t.ttft is not None and t.tokens > 1 and t.seconds > t.ttft
    ]
    ttfts = sorted(t.ttft for t in tallies if t.ttft is not None)
    return {
        "streams": len(prompts),
        "complete": not scope.cancelled_caught and all(t.done for t in tallies),
        "streams_done": sum(t.done for t in tallies),
        "tokens": total,
        "wall_s": round(wall, 3),
        "aggregate_tok_s": round(total / wall, 1) if wall > 0 else None,
        "median_stream_decode_tok_s": round(statistics.median(decode_rates), 1) if decode_rates else None,
        "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
        "ttft_p95_s": round(p95, 4) if (p95 := percentile(ttfts, 95)) is not None else None,
    }


def short_prompts(count: int) -> list[str]:
    return [f"Stream {i}: tell me a long story about the sea." for i in range(count)]


def long_prompts(count: int, length: int) -> list[str]:
    """Prompts of exactly ``length`` tokens in the Harmony encoding, different for every stream."""
    from app.prompts.harmony_encoding import harmony_encoding

    encoding = harmony_encoding()
    prompts = []
    for i in range(count):
        head = f"Request {i}:"
        text = head + " hello" * max(1, length - len(encoding.encode(head, allowed_special="all")))
        while len(encoding.encode(text, allowed_special="all")) > length:
            text = text[: -len(" hello")]
        prompts.append(text)
    return prompts


async def server_phases(plan: Plan, weights: Any, report: Report, capture: Capture) -> None:
    """Start the server (graphs captured through ``capture`` when the plan asks for graphs), measure
    it, and record how many of its decode steps were replays."""
    from hypercorn.trio import serve

    from app.cli import hypercorn_config
    from app.config import ModelSettings, ServerConfig, profile_with
    from app.engine.loader import serve_weights
    from app.server import create_server

    profile = profile_with(plan.profile, max_batch_size=plan.max_batch, max_queue=max(512, plan.max_batch * 2))
    config = ServerConfig(
        model=weights.source.model_id,
        port=0,
        profile=profile,
        log_level="warning",
        cuda_graphs=plan.cuda_graphs,
        max_seq_len=plan.max_seq_len,
    )
    log = CaptureLog(capture)

    def load() -> Any:
        return serve_weights(
            weights,
            ModelSettings(cuda_graphs=plan.cuda_graphs, max_seq_len=plan.max_seq_len, prefix_cache_bytes=0),
            max_batch_size=plan.max_batch,
            precapture_positions=plan.max_seq_len,
            capture=log,
        )

    server = create_server(config, loader=load, wait_for_model=True)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def start() -> dict[str, Any]:
            began = time.monotonic()
            serving = functools.partial(serve, server.asgi, hypercorn_config(config), shutdown_trigger=shutdown.wait)
            binds = await nursery.start(serving)
            model = server.pipeline.model
            graphs = getattr(getattr(model, "runner", None), "graphs", None)
            return {
                "url": binds[0],
                "start_s": round(time.monotonic() - began, 2),
                "decode_path": getattr(model, "decode_path", None),
                "max_context": getattr(model, "max_context", None),
                "profile": dataclasses.asdict(profile),
                "graphs_captured": graphs.captured if graphs is not None else 0,
                "graph_capture_s": round(graphs.capture_seconds, 2) if graphs is not None else 0,
                "graph_failure": graphs.failure if graphs is not None else None,
                **log.record(),
            }

        started = await report.arun("server_start", start)
        if started is not None:
            info = report.info["server"] = {k: v for k, v in started.items() if k != "url"}
            await measure_server(plan, started["url"], report)
            # Replays while serving the streams, not those of start-up's warm-up and captures.
            info["graph_replays_serving"] = log.replays - started["graph_replays"]
            info["graph_captures_end"] = log.captures
            info["capture_traceback"] = log.tracebacks[0] if log.tracebacks else None
            report.checkpoint(report)
        shutdown.set()
        nursery.cancel_scope.deadline = trio.current_time() + 10


async def measure_server(plan: Plan, url: str, report: Report) -> None:
    one = await report.arun(
        "server_1_stream", lambda: stream_phase(url, short_prompts(1), plan.stream_tokens, report.limit("stream_phase"))
    )
    report.figures["server_decode_1"] = one["median_stream_decode_tok_s"] if one else None
    for count in plan.stream_counts:
        many = await report.arun(
            f"server_{count}_streams",
            functools.partial(
                stream_phase, url, short_prompts(count), plan.stream_tokens, report.limit("stream_phase")
            ),
        )
        report.figures[f"server_aggregate_{count}"] = many["aggregate_tok_s"] if many else None
    prompts = long_prompts(plan.ttft_streams, plan.ttft_prompt_tokens)
    ttft = await report.arun(
        "server_ttft", lambda: stream_phase(url, prompts, plan.ttft_max_tokens, report.limit("ttft"))
    )
    report.figures["server_ttft_p95"] = ttft["ttft_p95_s"] if ttft else None
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            stats = (await client.get("/stats")).json()
    except httpx.HTTPError as error:  # a server that broke under the phases still gets its table
        report.info["server_stats"] = {"error": f"{type(error).__name__}: {error}"}
        return
    # The server's own view (requests by outcome, cache hits: none expected, tokens, latencies).
    report.info["server_stats"] = next(iter(stats.get("model_metrics", {}).values()), stats)

"""Operations endpoints: GET /health and GET /stats."""

from __future__ import annotations

import dataclasses
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response
from quart_trio import QuartTrio

from actors.pipeline import Pipeline
from app.contract.model import ServedModel
from app.http.context import ServerState
from app.http.json_response import json_response


def health_body(state: ServerState) -> tuple[dict[str, Any], int]:
    pipeline = state.pipeline
    model = pipeline.model
    status = {"ready": "ok"}.get(pipeline.state, pipeline.state)
    scheduler = pipeline.scheduler
    now = pipeline.clock()
    step_running = None if scheduler is None or scheduler.busy_since is None else now - scheduler.busy_since
    if status == "ok" and step_running is not None and step_running > state.config.step_timeout:
        status = "stalled"  # the step thread is stuck (a kernel, a deadlock): nothing moves
    elif status == "ok" and scheduler is not None and scheduler.stats.degraded:
        status = "degraded"  # steps keep failing: route traffic elsewhere until one succeeds
    body: dict[str, Any] = {
        "status": status,
        "model_id": model.model_id if model else None,
        "model_size": model.model_size if model else None,
        "dtype": model.dtype if model else None,
        "device": model.device if model else None,
        "decode_path": model.decode_path if model else None,
        "profile": state.config.profile.name,
        "profile_settings": dataclasses.asdict(state.config.profile),
        "max_context": model.max_context if model else None,
        # What a request that leaves a sampling field (or max_tokens) out gets, and from where.
        "sampling_defaults": model.sampling_defaults.shown() if model else None,
        "memory_pools": pools_body(model),
        "version": state.version,
        "uptime_s": round(pipeline.clock() - pipeline.started_at, 3),
        "runtime": state.runtime(),
    }
    if pipeline.failure:
        body["error"] = pipeline.failure
    if scheduler is not None and scheduler.stats.failing_steps:
        body["failing_steps"] = scheduler.stats.failing_steps
    if scheduler is not None:
        last = scheduler.last_step_at
        body["last_step_age_s"] = None if last is None else round(now - last, 3)
        body["step_running_s"] = None if step_running is None else round(step_running, 3)
    return body, 200 if status == "ok" else 503


def pools_body(model: ServedModel | None) -> dict[str, Any] | None:
    """What the runner reserved at start-up, by pool: its bytes and what it is made of."""
    if model is None:
        return None
    return {pool.name: {"bytes": pool.bytes, **dict(pool.figures)} for pool in model.memory_pools}


def memory_body(state: ServerState) -> dict[str, Any]:
    """The process's resident memory, and the GPU allocator's figures when on CUDA."""
    import psutil

    memory: dict[str, Any] = {"rss_bytes": psutil.Process().memory_info().rss}
    if (gpu := state.gpu_memory()) is not None:
        memory["gpu_allocated_bytes"], memory["gpu_reserved_bytes"] = gpu
    return memory


def cache_body(pipeline: Pipeline) -> dict[str, Any]:
    if pipeline.cache is None:
        return {"enabled": False}
    stats = pipeline.cache.stats
    shared = pipeline.cache.shared
    return {
        "enabled": True,
        "hits": stats.hits,
        "misses": stats.misses,
        "hit_rate": round(stats.hit_rate, 6),
        "evictions": stats.evictions,
        "entries": stats.entries,
        "bytes": stats.bytes,
        "max_entries": stats.max_entries,
        "max_bytes": stats.max_bytes,
        "shared_generations": pipeline.cache.flights,
        # The tier replicas share (--redis-url): lookups that missed in memory.
        "shared": None if shared is None else {"hits": shared.hits, "misses": shared.misses},
    }


def stats_body(state: ServerState) -> dict[str, Any]:
    pipeline = state.pipeline
    scheduler = pipeline.scheduler.stats if pipeline.scheduler else None
    figures = pipeline.metrics.book.snapshot()
    figures.update(
        {
            "memory": memory_body(state),
            "active_sequences": scheduler.running if scheduler else 0,
            "queue_depth": scheduler.waiting if scheduler else 0,
            "active_streams": pipeline.active_streams,
            "active_generations": pipeline.active_relays,
            "scheduler_steps": scheduler.steps if scheduler else 0,
            "cache": cache_body(pipeline),
            "memory_pools": pools_body(pipeline.model),
        }
    )
    prefix_max = state.config.prefix_cache_bytes
    reserved = (figures["memory_pools"] or {}).get("prefix_cache", {}).get("bytes", 0)
    figures["prefix_cache"] = {
        "enabled": prefix_max > 0,
        "max_bytes": prefix_max,
        "reserved_bytes": reserved,
        **figures["prefix_cache"],
    }
    model_id = pipeline.model.model_id if pipeline.model else state.config.model
    return {
        "model_metrics": {model_id: figures},
        # The figures the users' checks read most, at the top level too.
        "active_sequences": figures["active_sequences"],
        "cancelled_requests": figures["cancelled_requests"],
    }


def register(app: QuartTrio, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        body, status = health_body(state)
        return json_response(body, status)

    @app.get("/stats")
    async def stats() -> Response:
        return json_response(stats_body(state))

    @app.get("/metrics")
    async def metrics() -> Response:
        registry = state.pipeline.metrics.book.prometheus.registry
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

"""Reading the server's /stats for the P0 checks: its figures, and waiting for it to settle."""

from __future__ import annotations

from typing import Any, cast

import httpx
import trio


async def read_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/stats")
    response.raise_for_status()
    return cast(dict[str, Any], response.json())


def model_figures(stats: dict[str, Any]) -> dict[str, Any]:
    metrics = stats.get("model_metrics") or {}
    return cast(dict[str, Any], next(iter(metrics.values()))) if metrics else {}


def completion_tokens(stats: dict[str, Any]) -> int:
    return int(model_figures(stats).get("tokens", {}).get("completion", 0))


async def settled(client: httpx.AsyncClient, timeout: float, sequences: int = 0) -> dict[str, Any]:
    """Stats once at most ``sequences`` sequences run and the completion count holds still over
    two reads (the metrics are counted by an actor of their own, a moment after the step), or
    the last stats read after ``timeout``."""
    stats = await read_stats(client)
    with trio.move_on_after(timeout):
        while True:
            await trio.sleep(0.05)
            again = await read_stats(client)
            still = completion_tokens(again) == completion_tokens(stats)
            stats = again
            if still and model_figures(stats).get("active_sequences", 0) <= sequences:
                return stats
    return stats


def memory_of(stats: dict[str, Any]) -> tuple[int, int]:
    """RSS and GPU bytes allocated, as they are: the server reserves its caches' pools at start-up
    (/stats ``memory_pools``), so nothing it holds by design grows under a load, and a check counts
    every byte that does."""
    memory = model_figures(stats).get("memory", {})
    return int(memory.get("rss_bytes", 0)), int(memory.get("gpu_allocated_bytes", 0))


async def wait_idle(client: httpx.AsyncClient, timeout: float = 10.0) -> dict[str, Any]:
    """Stats once the dropped streams' teardown is done (or after ``timeout``)."""
    with trio.move_on_after(timeout):
        while True:
            stats = await read_stats(client)
            figures = model_figures(stats)
            if not figures.get("active_sequences") and not figures.get("active_streams"):
                return stats
            await trio.sleep(0.05)
    return await read_stats(client)

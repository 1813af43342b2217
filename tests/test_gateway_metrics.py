"""The gauges an inference gateway routes by (the Gateway API Inference Extension's model-server
protocol, under vLLM's names), on a live server whose batch fills up and drains."""

from __future__ import annotations

import dataclasses

import httpx
import trio

from actors.gateway_series import KV_USAGE, KV_USAGE_BEFORE, RUNNING, WAITING
from app.config import PROFILES
from app.engine.loader import ModelWeights
from tests.conftest import running_server, server_config
from tests.fakes import slow_steps
from tests.test_observability import samples

ROWS = 2


def gateway(text: str) -> dict[str, float]:
    found = samples(text)
    figures: dict[str, float] = {}
    for name in (WAITING, RUNNING, KV_USAGE, KV_USAGE_BEFORE):
        entries = found[name]
        assert [labels for labels, _ in entries] == [{"model_name": "tiny-gpt-oss"}], (name, entries)
        figures[name] = entries[0][1]
    return figures


async def scrape_until(client: httpx.AsyncClient, want: dict[str, float]) -> dict[str, float]:
    figures: dict[str, float] = {}
    for _ in range(400):
        figures = gateway((await client.get("/metrics")).text)
        if figures == want:
            return figures
        await trio.sleep(0.02)
    raise AssertionError(f"/metrics never showed {want}: last {figures}")


async def test_queue_and_kv_rows_as_a_gateway_reads_them(tiny_weights: ModelWeights) -> None:
    profile = dataclasses.replace(PROFILES["latency_first"], max_batch_size=ROWS, max_queue=4)
    config = server_config(profile=profile)
    idle = {WAITING: 0.0, RUNNING: 0.0, KV_USAGE: 0.0, KV_USAGE_BEFORE: 0.0}
    async with running_server(tiny_weights, config, step_caller=slow_steps(0.05)) as server, server.client() as client:
        assert gateway((await client.get("/metrics")).text) == idle, "present at 0 before any request"

        async def long_stream(prompt: str) -> None:
            body = {"prompt": prompt, "max_tokens": 5000, "stream": True}
            async with client.stream("POST", "/generate", json=body) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_stream, "one")
            await scrape_until(client, {WAITING: 0.0, RUNNING: 1.0, KV_USAGE: 0.5, KV_USAGE_BEFORE: 0.5})
            for prompt in ("two", "three"):
                nursery.start_soon(long_stream, prompt)
            # Both rows held, the third request waits for one.
            await scrape_until(client, {WAITING: 1.0, RUNNING: 2.0, KV_USAGE: 1.0, KV_USAGE_BEFORE: 1.0})
            nursery.cancel_scope.cancel()  # the clients go: their rows are freed
        await scrape_until(client, idle)

"""The series an inference gateway routes by, under the names it reads.

The Kubernetes Gateway API Inference Extension's endpoint picker (and llm-d's scheduler) scrape
each model server for three gauges of its model-server protocol: requests queued, requests
running, and KV-cache utilization. Its defaults read vLLM's names, so we export ours under them
too, next to the ``gptoss_`` series, with vLLM's ``model_name`` label; a gateway then needs no
per-server metric flags.

KV-cache utilization here is the share of the batch's KV rows that sequences hold (running /
max_batch_size): each running sequence holds one row of the cache until it ends, and a request
waits exactly when every row is taken, which is what the picker wants to know (vLLM's figure,
the share of its preallocated KV blocks in use, says the same: past 1.0, requests queue).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
# The name the endpoint picker read before vLLM renamed it (v0.10); older gateways still ask for it.
KV_USAGE_BEFORE = "vllm:gpu_cache_usage_perc"
LABEL = "model_name"


class GatewaySeries:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.waiting = Gauge(
            WAITING, "Requests waiting for a row of the batch (gateway protocol)", [LABEL], registry=registry
        )
        self.running = Gauge(RUNNING, "Requests in the running batch (gateway protocol)", [LABEL], registry=registry)
        self.kv_usage = Gauge(
            KV_USAGE, "Share of the batch's KV-cache rows in use, 0 to 1 (gateway protocol)", [LABEL], registry=registry
        )
        self.kv_usage_before = Gauge(
            KV_USAGE_BEFORE, f"The same as {KV_USAGE}, under its older name", [LABEL], registry=registry
        )
        self._model: str | None = None
        self._rows = 1

    def bind(self, model_id: str, batch_rows: int) -> None:
        """The model's name and the batch's rows (max_batch_size); every gauge starts at 0."""
        self._model, self._rows = model_id, max(1, batch_rows)
        self.set(running=0, waiting=0)

    def set(self, running: int, waiting: int) -> None:
        if self._model is None:
            return
        usage = min(1.0, running / self._rows)
        self.waiting.labels(self._model).set(waiting)
        self.running.labels(self._model).set(running)
        self.kv_usage.labels(self._model).set(usage)
        self.kv_usage_before.labels(self._model).set(usage)

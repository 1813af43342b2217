"""The Prometheus series this server exports, in a registry of its own (one per server, so tests can
run several). Every series is labelled with the model and its size. Only the metrics actor writes
them; /metrics only reads."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from actors.gateway_series import GatewaySeries

LABELS = ("model", "model_size")
# Latencies from milliseconds (a cache hit, one decode step) to minutes (a long answer under load).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# Model steps that ran for a request after it was aborted (one at most: the step in flight).
TEARDOWN_STEP_BUCKETS = (0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 25.0, 100.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# (allocated, reserved) bytes of the accelerator's allocator, or None when there is none. Given by
# the wiring (app.engine.runtime_info.gpu_memory): the actors do not import torch.
GpuMemoryProbe = Callable[[], "tuple[int, int] | None"]


class GpuMemoryCollector(Collector):
    """The accelerator allocator's figures, read at scrape time (nothing when not on CUDA)."""

    def __init__(self, labels: tuple[str, str], probe: GpuMemoryProbe) -> None:
        self._labels = labels
        self._probe = probe

    def collect(self) -> Iterable[Metric]:
        if (gpu := self._probe()) is None:
            return []
        allocated = GaugeMetricFamily(
            "gptoss_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=list(LABELS)
        )
        reserved = GaugeMetricFamily(
            "gptoss_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator", labels=list(LABELS)
        )
        allocated.add_metric(list(self._labels), float(gpu[0]))
        reserved.add_metric(list(self._labels), float(gpu[1]))
        return [allocated, reserved]


class PrometheusSeries:
    def __init__(self, gpu_memory: GpuMemoryProbe | None = None) -> None:
        self._gpu_memory = gpu_memory
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        r = self.registry
        self.ttft = Histogram(
            "gptoss_time_to_first_token_seconds",
            "Request arrival to first token",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "gptoss_e2e_request_latency_seconds",
            "Request arrival to its last event",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "gptoss_inter_token_latency_seconds",
            "Time between two tokens of one sequence",
            LABELS,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "gptoss_request_queue_time_seconds",
            "Request arrival to joining the batch",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.teardown = Histogram(
            "gptoss_cancel_teardown_seconds",
            "Client disconnect (or other abort) to the sequence's row freed",
            LABELS,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.teardown_steps = Histogram(
            "gptoss_cancel_teardown_steps",
            "Model steps that ran between an abort and the sequence's row freed",
            LABELS,
            buckets=TEARDOWN_STEP_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "gptoss_requests_total", "Generation requests by how they ended", (*LABELS, "status"), registry=r
        )
        self.prompt_tokens = Counter("gptoss_prompt_tokens_total", "Prompt tokens prefilled", LABELS, registry=r)
        self.generation_tokens = Counter("gptoss_generation_tokens_total", "Tokens generated", LABELS, registry=r)
        self.cache_hits = Counter("gptoss_cache_hits_total", "Requests served by the prompt cache", LABELS, registry=r)
        self.cache_misses = Counter(
            "gptoss_cache_misses_total", "Cacheable requests that had to generate", LABELS, registry=r
        )
        self.redis_errors = Counter(
            "gptoss_redis_errors_total",
            "Calls to the shared Redis that failed or were skipped while it was down (the request went on without it)",
            (*LABELS, "op"),
            registry=r,
        )
        self.disconnects = Counter(
            "gptoss_client_disconnects_total", "Clients gone before their response ended", LABELS, registry=r
        )
        self.malformed_tool_calls = Counter(
            "gptoss_malformed_tool_calls_total",
            "Tool calls answered as text: an unknown function, or arguments that are not a JSON object",
            (*LABELS, "reason"),
            registry=r,
        )
        self.prefix_lookups = Counter(
            "gptoss_prefix_cache_lookups_total", "Sequences that looked up the prefix KV cache", LABELS, registry=r
        )
        self.prefix_hits = Counter(
            "gptoss_prefix_cache_hits_total", "Sequences that started from a cached prefix", LABELS, registry=r
        )
        self.prefix_hit_tokens = Counter(
            "gptoss_prefix_cache_hit_tokens_total",
            "Prompt tokens not prefilled: their keys came from the prefix KV cache",
            LABELS,
            registry=r,
        )
        self.prefix_evictions = Counter(
            "gptoss_prefix_cache_evictions_total", "Prefix KV cache blocks evicted to make room", LABELS, registry=r
        )
        self.prefix_bytes = Gauge("gptoss_prefix_cache_bytes", "Bytes the prefix KV cache holds", LABELS, registry=r)
        self.prefix_blocks = Gauge("gptoss_prefix_cache_blocks", "Blocks the prefix KV cache holds", LABELS, registry=r)
        self.running = Gauge("gptoss_requests_running", "Sequences in the running batch", LABELS, registry=r)
        self.waiting = Gauge("gptoss_requests_waiting", "Requests waiting for the batch", LABELS, registry=r)
        self.info = Gauge("gptoss_model_info", "The served model", (*LABELS, "dtype", "device", "profile"), registry=r)
        self.gateway = GatewaySeries(r)
        self.labels: tuple[str, str] | None = None

    def bind(self, model_id: str, model_size: str, dtype: str, device: str, profile: str, batch_rows: int = 1) -> None:
        """Set the labels every series carries; called once the model is loaded."""
        self.labels = (model_id, model_size)
        self.gateway.bind(model_id, batch_rows)
        self.info.labels(model_id, model_size, dtype, device, profile).set(1)
        for status in ("ok", "error", "cancelled", "rejected"):
            self.requests.labels(model_id, model_size, status)  # present at 0 from the start
        if self._gpu_memory is not None:
            self.registry.register(GpuMemoryCollector(self.labels, self._gpu_memory))

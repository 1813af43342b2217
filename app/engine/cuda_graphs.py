"""CUDA graphs of a step function: captured once per shape, replayed after.

A decode step of a small batch is almost all kernel-launch and Python overhead on a GPU; a CUDA
graph replays the whole step's kernels with one launch. The step must read its inputs from static
device buffers and write its output to the same tensor on every call (``StaticDecoder`` does), so
each (batch, kv_length) bucket has one graph.

Capture is attempted on first use of a bucket. If it fails (an operation that copies from the
host or synchronises inside the step, or no memory left), no further graph is captured, with one
log line: buckets without a graph run eagerly from then on (slower, never wrong), the graphs
already captured keep replaying. Without CUDA the step always runs
eagerly, which is how the CPU tests drive the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import structlog
import torch

from app.contract.failures import first_line

log = structlog.get_logger("engine.cuda_graphs")

Step = Callable[[], torch.Tensor]
Replay = Callable[[], torch.Tensor]
# Capture ``step`` and return a replay that reruns its kernels and returns the same output tensor.
Capture = Callable[[Step], Replay]


def cuda_graph_capture(warmup_runs: int = 1) -> Capture:
    """The real capture: warm up on a side stream (lazy initialisation must not be captured), then
    record one run into a graph that shares a memory pool with the others."""
    pool = torch.cuda.graph_pool_handle()

    def capture(step: Step) -> Replay:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_runs):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the runner runs in whichever worker thread trio hands it.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            output = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay

    return capture


class StepGraphs:
    """One captured graph per key, or eager steps when graphs are off or have failed."""

    def __init__(self, capture: Capture | None) -> None:
        self._capture = capture
        self._replays: dict[Hashable, Replay] = {}
        self.failure: str | None = None
        self.capture_seconds = 0.0

    @classmethod
    def for_device(cls, device: torch.device, enabled: bool) -> StepGraphs:
        if enabled and device.type != "cuda":
            log.info("cuda_graphs_off", reason=f"the model is on {device}: the static decode path runs eagerly")
        return cls(cuda_graph_capture() if enabled and device.type == "cuda" else None)

    @property
    def enabled(self) -> bool:
        return self._capture is not None

    @property
    def captured(self) -> int:
        return len(self._replays)

    def has(self, key: Hashable) -> bool:
        return key in self._replays

    def run(self, key: Hashable, step: Step) -> torch.Tensor:
        replay = self._replays.get(key)
        if replay is not None:
            return replay()
        if self._capture is None:
            return step()
        started = time.perf_counter()
        try:
            replay = self._capture(step)
        except Exception as error:  # any failure to capture: keep serving, eagerly
            self._give_up(key, error)
            return step()
        seconds = time.perf_counter() - started
        self.capture_seconds += seconds
        self._replays[key] = replay
        log.debug("cuda_graph_captured", key=repr(key), seconds=round(seconds, 3), graphs=len(self._replays))
        return replay()

    def _give_up(self, key: Hashable, error: Exception) -> None:
        self.failure = f"{type(error).__name__}: {str(error).strip() and first_line(error)}"
        log.warning(
            "cuda_graphs_disabled",
            reason="capture failed; shapes without a graph run eagerly from now on",
            key=repr(key),
            error=self.failure,
        )
        self._capture = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # surfaces a broken context here rather than in a later step

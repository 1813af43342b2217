"""Which capture a run's static path uses, and a record of what it captured and replayed.

``StepGraphs`` turns a failed capture into one log line and eager steps, and a replayed graph
looks like an eager step from outside; so the check counts for itself, around the capture it
hands in, and keeps each failure's whole traceback.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.engine.cuda_graphs import Capture, Replay, Step, cuda_graph_capture
from tools.gpu_check.frozen_capture import FrozenCapture
from tools.gpu_check.plan import Plan

# A fresh capture for each runner (on CUDA each has its own memory pool).
CaptureFactory = Callable[[], Capture]


def capture_factory(plan: Plan) -> CaptureFactory:
    if plan.capture == "frozen":
        return FrozenCapture
    if plan.capture == "cuda":
        return cuda_graph_capture
    raise ValueError(f"unknown capture {plan.capture!r}: use 'cuda' or 'frozen'")


@dataclass
class CaptureLog:
    """A capture that counts what ``inner`` captured and how often the results were replayed."""

    inner: Capture
    captures: int = 0
    replays: int = 0
    tracebacks: list[str] = field(default_factory=list)

    def __call__(self, step: Step) -> Replay:
        try:
            replay = self.inner(step)
        except Exception:
            self.tracebacks.append(traceback.format_exc())
            raise
        self.captures += 1

        def counted() -> torch.Tensor:
            self.replays += 1
            return replay()

        return counted

    def record(self) -> dict[str, object]:
        return {
            "graph_captures": self.captures,
            "graph_replays": self.replays,
            "capture_traceback": self.tracebacks[0] if self.tracebacks else None,
        }

"""What every route needs, handed in by the wiring (app/server.py) when it registers them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from actors.pipeline import Pipeline
from actors.prometheus_series import GpuMemoryProbe
from app.config import ServerConfig
from app.http.response_store import AsyncResponseStore
from app.store.reasoning_seal import ReasoningSeal


@dataclass(frozen=True, slots=True)
class ServerState:
    config: ServerConfig
    pipeline: Pipeline
    version: str
    runtime: Callable[[], dict[str, Any]]  # what the serving machine runs: versions, the accelerator
    gpu_memory: GpuMemoryProbe  # (allocated, reserved) bytes on the accelerator, or None
    responses: AsyncResponseStore  # /v1/responses' stored responses
    reasoning: ReasoningSeal  # seals and opens reasoning items' encrypted_content
    # Prompt work (tokenizing a request, its cache key) runs in a worker thread, one at a time.
    prompt_work: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))
    # Threads that wait on the grammar engine's compile workers (which bound the compiles), apart
    # from the prompt thread: a slow compile holds one of these, never a prompt.
    grammar_work: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(4))

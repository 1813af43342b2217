"""Named scheduler profiles; the flags that override one are declared on Profile's fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from dataclasses import field as declared_field
from typing import Any

from app.config.declare import flag, setting
from app.config.values import ConfigError


@dataclass(frozen=True, slots=True)
class Profile:
    """A named set of scheduler settings; each can be overridden on its own."""

    name: str
    max_batch_size: int = declared_field(
        metadata=flag("--max-batch-size", read=int, help="most sequences decoded together (overrides the profile)")
    )
    max_queue: int = declared_field(
        metadata=flag(
            "--max-queue", read=int, help="most requests waiting for the batch; more get 429 (overrides the profile)"
        )
    )
    # All sequences' prompt tokens together.
    prefill_chunk_tokens: int = declared_field(
        metadata=flag("--prefill-chunk", read=int, help="most prompt tokens per prefill step (overrides the profile)")
    )
    max_consecutive_prefills: int  # prefill steps in a row before the running batch decodes
    # Clients that were answered in the same step come back together, and one prefill of all of
    # them beats a lone one that the others then wait behind (p95 TTFT).
    arrival_window_ms: int = setting(
        2,
        "--arrival-window-ms",
        read=int,
        help="when the batch is empty, wait this long for more requests before the first prefill "
        "(overrides the profile)",
    )
    # The prompt chunk fills the room the decoding rows leave, in the same forward as their tokens
    # (chunked prefill), so the running streams are not stalled by it. 0: prefill steps and decode
    # steps alternate (max_consecutive_prefills).
    step_token_budget: int = setting(
        0,
        "--step-token-budget",
        read=int,
        help="tokens per mixed step, decoding rows and prompt chunks together: a prompt arriving "
        "while others decode is prefilled alongside them; 0 alternates prefill and decode steps "
        "(overrides the profile)",
    )
    # The most a mixed step may take, as a multiple of a decode step, once both have been measured:
    # its prompt chunk is sized to keep within it (app.batching.step_pace). 0: the budget alone.
    mixed_step_slowdown: float = 0.0

    def __post_init__(self) -> None:
        for field in ("max_batch_size", "max_queue", "prefill_chunk_tokens", "max_consecutive_prefills"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"profile {self.name}: {field} must be a positive integer, got {value!r}")
        window = self.arrival_window_ms
        if not isinstance(window, int) or isinstance(window, bool) or not 0 <= window <= 1000:
            raise ConfigError(f"profile {self.name}: arrival_window_ms must be 0..1000, got {window!r}")
        budget = self.step_token_budget
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ConfigError(f"profile {self.name}: step_token_budget must be 0 or more, got {budget!r}")
        slowdown = self.mixed_step_slowdown
        if not isinstance(slowdown, int | float) or isinstance(slowdown, bool) or not (slowdown == 0 or slowdown > 1):
            raise ConfigError(f"profile {self.name}: mixed_step_slowdown must be 0 or more than 1, got {slowdown!r}")


PROFILES = {
    # The seed's: new prompts are prefilled first and in small chunks, batches stay moderate, the
    # queue is short so overload is refused early rather than answered late.
    # A prompt that arrives while others decode rides along in mixed steps of up to 256 tokens,
    # fewer where that would make the step more than 1.8x a decode step (the streams' latency).
    "latency_first": Profile(
        "latency_first",
        max_batch_size=16,
        max_queue=64,
        prefill_chunk_tokens=512,
        max_consecutive_prefills=2,
        step_token_budget=256,
        mixed_step_slowdown=1.6,
    ),
    # Fill the batch: more rows, longer prefill chunks, a deeper queue.
    "throughput_first": Profile(
        "throughput_first",
        max_batch_size=64,
        max_queue=512,
        prefill_chunk_tokens=2048,
        max_consecutive_prefills=4,
        arrival_window_ms=5,
        step_token_budget=2048,
    ),
}


def profile_with(name: str, **overrides: int | None) -> Profile:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}: use one of {', '.join(PROFILES)}")
    chosen: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(PROFILES[name], **chosen)

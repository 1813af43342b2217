"""Every message that crosses between actors: frozen, each naming its request.

Times are ``time.monotonic()`` seconds, taken where the thing happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import trio

from app.engine.params import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "timeout", "shutdown", "error"]
AbortReason = Literal["client_disconnect", "stop_string", "timeout", "shutdown", "stalled", "relay_error"]


# -- to the scheduler -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Submit:
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    received_at: float
    # Sized by the sender so that the scheduler's send_nowait cannot fail while the stream lives.
    events: trio.MemorySendChannel[SchedulerEvent] = field(repr=False, compare=False)
    deadline: float | None = None  # monotonic time past which the request ends with "timeout"


@dataclass(frozen=True, slots=True)
class Abort:
    """Stop a request's work. Idempotent: twice, or after it finished, is fine."""

    request_id: str
    reason: AbortReason
    at: float
    # The scheduler's finished steps when the abort was sent: the steps that ran before the row
    # was freed are counted from here (one at most: the step in flight).
    steps: int = 0


@dataclass(frozen=True, slots=True)
class AbortAll:
    """Stop every queued and running request (shutdown): each ends with ``reason``."""

    reason: AbortReason
    at: float
    steps: int = 0


SchedulerMessage = Submit | Abort | AbortAll


# -- from the scheduler, to one request's relay -----------------------------------------------
@dataclass(frozen=True, slots=True)
class Queued:
    request_id: str
    position: int
    at: float


@dataclass(frozen=True, slots=True)
class Rejected:
    request_id: str
    status: int  # HTTP status the client gets (429 queue full, 503 not ready or draining)
    message: str
    retry_after: float | None
    at: float


@dataclass(frozen=True, slots=True)
class Admitted:
    request_id: str
    at: float


@dataclass(frozen=True, slots=True)
class TokenOut:
    request_id: str
    token_id: int
    index: int
    at: float
    finish_reason: FinishReason | None = None  # set on the token that ends the sequence
    is_stop_token: bool = False  # an end-of-sequence token: counted, not shown as text


@dataclass(frozen=True, slots=True)
class Finished:
    """The request's terminal event from the scheduler: its row is already freed."""

    request_id: str
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    at: float


@dataclass(frozen=True, slots=True)
class Failed:
    request_id: str
    message: str
    error_type: str
    at: float


SchedulerEvent = Queued | Rejected | Admitted | TokenOut | Finished | Failed


# -- to the metrics actor (sent with send_nowait; it never makes a sender wait) ---------------
# Two levels: what each HTTP request got (received, its outcome: from the pipeline and its stream
# handle, cache hits included), and what the model did (from the scheduler: queueing, steps,
# tokens, how long a cancelled sequence held its row).
RequestStatus = Literal["ok", "error", "cancelled", "rejected"]


@dataclass(frozen=True, slots=True)
class ModelLoaded:
    model_id: str
    model_size: str
    dtype: str
    device: str
    profile: str


@dataclass(frozen=True, slots=True)
class RequestReceived:
    request_id: str
    prompt_tokens: int
    cache_key: str
    prompt_version: str
    cacheable: bool


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """How an HTTP request ended, as its client saw it."""

    request_id: str
    status: RequestStatus
    finish_reason: str  # stop, length, cancelled, timeout, shutdown, client_disconnect, error, 429...
    cached: bool  # served by the prompt cache: no generation of its own
    completion_tokens: int
    queue_ms: float | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None


@dataclass(frozen=True, slots=True)
class RequestQueued:
    request_id: str
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class RequestRejected:
    request_id: str
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class RequestAdmitted:
    request_id: str
    queue_seconds: float


@dataclass(frozen=True, slots=True)
class FirstToken:
    request_id: str
    ttft_seconds: float


@dataclass(frozen=True, slots=True)
class StepCompleted:
    kind: str  # "prefill" | "decode"
    batch_size: int
    new_tokens: int  # tokens that went through the model (prompt tokens for a prefill)
    generated_tokens: int  # tokens chosen this step
    seconds: float
    inter_token_seconds: tuple[float, ...]  # one per decoded sequence: time since its last token


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """A generation left the batch (its row is freed before the next step)."""

    request_id: str
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    e2e_seconds: float
    # For an aborted request: abort sent to row freed, in seconds and in model steps (how long,
    # and how much work, the request cost after its client left).
    teardown_seconds: float | None = None
    teardown_steps: int | None = None
    abort_reason: AbortReason | None = None


@dataclass(frozen=True, slots=True)
class RequestFailed:
    request_id: str
    error_type: str
    message: str


@dataclass(frozen=True, slots=True)
class QueueState:
    running: int
    waiting: int


@dataclass(frozen=True, slots=True)
class ClientDisconnected:
    request_id: str


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """A cacheable request looked up the prompt cache (a request that joins a running identical
    generation counts as a hit: it costs the GPU nothing)."""

    request_id: str
    hit: bool


MetricsEvent = (
    ModelLoaded
    | RequestReceived
    | RequestOutcome
    | RequestQueued
    | RequestRejected
    | RequestAdmitted
    | FirstToken
    | StepCompleted
    | RequestFinished
    | RequestFailed
    | QueueState
    | ClientDisconnected
    | CacheLookup
)


# -- from a relay to its HTTP response ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Timings:
    """Milliseconds from the request's arrival, as the client is told them."""

    queue_ms: float
    prefill_ms: float | None  # admitted to first token
    ttft_ms: float | None
    e2e_ms: float


CacheStatus = Literal["HIT", "MISS", "BYPASS"]


@dataclass(frozen=True, slots=True)
class StreamStarted:
    request_id: str
    queue_position: int
    cache: CacheStatus = "BYPASS"  # HIT: served without a generation of its own


@dataclass(frozen=True, slots=True)
class StreamRejected:
    request_id: str
    status: int
    message: str
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class StreamToken:
    request_id: str
    text: str  # may be "" while a character or a possible stop string is held back
    token_id: int
    index: int
    channel: str | None = None  # Harmony channel for gpt-oss ("analysis", "final", ...)


@dataclass(frozen=True, slots=True)
class StreamDone:
    request_id: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


@dataclass(frozen=True, slots=True)
class StreamError:
    request_id: str
    message: str
    error_type: str


StreamEvent = StreamStarted | StreamRejected | StreamToken | StreamDone | StreamError

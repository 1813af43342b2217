"""Every event the metrics actor takes: frozen, sent with ``send_nowait`` (it never makes a sender
wait). Times are ``time.monotonic()`` seconds.

Two levels: what each HTTP request got (received, its outcome: from the pipeline and its stream
handle, cache hits included), and what the model did (from the scheduler: queueing, steps, tokens,
how long an aborted sequence held its row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.batching.finish import AbortReason, FinishReason
from app.contract.step import PrefixCacheStats

RequestStatus = Literal["ok", "error", "cancelled", "rejected"]


@dataclass(frozen=True, slots=True)
class ModelLoaded:
    model_id: str
    model_size: str
    dtype: str
    device: str
    profile: str
    batch_rows: int = 1  # the profile's max_batch_size: the KV-cache rows a sequence each holds


@dataclass(frozen=True, slots=True)
class RequestReceived:
    request_id: str
    prompt_tokens: int
    cache_key: str
    prompt_version: str
    cacheable: bool
    client_request_id: str | None = None  # the client's X-Request-Id: its log lines carry it


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
    kind: str  # "prefill" | "decode" | "mixed"
    batch_size: int
    new_tokens: int  # tokens that went through the model (prompt tokens for a prefill)
    generated_tokens: int  # tokens chosen this step
    seconds: float
    inter_token_seconds: tuple[float, ...]  # one per decoded sequence: time since its last token
    prompt_tokens: int = 0  # prompt tokens among new_tokens (a mixed step's chunks; all of a prefill's)


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


@dataclass(frozen=True, slots=True)
class RedisError:
    """A call to the shared Redis failed, or was skipped while it is down: the request went on
    without it (a cache miss, a write skipped) or, needing a stored response, got 503."""

    op: str  # cache_get, cache_put, cache_decode, responses_get, responses_put, responses_delete


@dataclass(frozen=True, slots=True)
class MalformedToolCall:
    """The model called a function the request did not offer, or with arguments that are not a
    JSON object: the answer carries its text as content (app.http.tool_calls)."""

    request_id: str
    reason: str  # "unknown_function" | "invalid_arguments"


@dataclass(frozen=True, slots=True)
class PrefixCacheState:
    """The prefix KV cache's counters and size, sent by the scheduler when they change."""

    stats: PrefixCacheStats


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
    | RedisError
    | MalformedToolCall
    | PrefixCacheState
)

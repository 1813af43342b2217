"""The messages of a request's life: to the scheduler, from it to the request's relay, and from the
relay to the HTTP response. Frozen, each naming its request (the metrics actor's events are in
actors/metrics_events.py).

Times are ``time.monotonic()`` seconds, taken where the thing happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import trio

from app.batching.finish import AbortReason, FinishReason
from app.contract.failures import FAILURE_MESSAGES, FailureCode
from app.contract.sampling import SamplingParams
from app.contract.step import TokenLogprobs
from app.text.logprobs import ShownLogprobs
from app.text.pieces import TextMode


# -- from the HTTP layer to the pipeline -------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GenerationJob:
    """A validated request, ready for the scheduler."""

    prompt: tuple[int, ...]
    params: SamplingParams
    received_at: float
    # The client's X-Request-Id, echoed to it and written in the logs; never a key of ours (the
    # pipeline names every request itself, so two clients with one id cannot touch each other).
    client_request_id: str | None = None
    deadline: float | None = None
    text_mode: TextMode = "plain"  # harmony: the prompt is a Harmony conversation, parse channels
    cache_key: str = ""  # reported to the client whether or not the cache is used
    cacheable: bool = False  # deterministic (greedy or seeded) and not opted out: the cache serves it
    prompt_version: str = ""
    # parallel_tool_calls false: the output ends where a second tool call would begin.
    single_call: bool = False
    # The caller's tenant (its API key, by name; None: unkeyed): its streams count against its own
    # --max-streams-per-key, and every cache key made for the job carries it.
    tenant: str | None = None


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
    # The request id (ours, never a client's) of a request with the same prompt whose prefill this
    # one shares: its keys are copied once they are in, instead of prefilling the prompt again.
    fork_from: str | None = None


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
    logprobs: TokenLogprobs | None = None  # the model's raw ones, when the request asked


@dataclass(frozen=True, slots=True)
class Finished:
    """The request's terminal event from the scheduler: its row is already freed."""

    request_id: str
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    at: float


@dataclass(frozen=True, slots=True)
class PromptReused:
    """The sequence joined with the keys of its prompt's first ``tokens`` tokens already in its row
    (the prefix KV cache's, or a forked choice's parent's): it prefills only the rest."""

    request_id: str
    tokens: int
    at: float


@dataclass(frozen=True, slots=True)
class Failed:
    request_id: str
    code: FailureCode  # what its client is told (app.contract.failures); the exception is logged
    at: float


SchedulerEvent = Queued | Rejected | Admitted | PromptReused | TokenOut | Finished | Failed


# -- from a relay to its HTTP response ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those whose keys were reused, not prefilled

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
    cache: CacheStatus = "BYPASS"  # HIT: served without a generation of its own


@dataclass(frozen=True, slots=True)
class StreamRejected:
    request_id: str
    status: int
    message: str
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class StreamToken:
    """One generated token. It names no request, so that the prompt cache can hand the same
    stored objects to every client it replays them to (the stream they travel on says whose)."""

    text: str  # may be "" while a character or a possible stop string is held back
    token_id: int
    index: int
    channel: str | None = None  # Harmony channel for gpt-oss ("analysis", "final", ...)
    # When the request asked for logprobs: this token's own (the native API shows every token's),
    # and those of the tokens whose text this event settles (app.text.pieces.TextPiece.shown),
    # which OpenAI's shapes list: its own, several when held Harmony headers turn out to be text,
    # none for structure and stop tokens. Held-back text does not hold back its token's entry.
    logprobs: ShownLogprobs | None = None
    text_logprobs: tuple[ShownLogprobs, ...] = ()
    # Harmony: the message's recipient ("functions.NAME": this text is a tool call's arguments;
    # None: to the user) and its ordinal in the output (two calls in a row are two messages).
    recipient: str | None = None
    message: int = 0
    # On a generation's first token: the prompt tokens whose keys were reused, not prefilled (so a
    # stream's running usage can say so before its end). None on every later token.
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class StreamDone:
    request_id: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


@dataclass(frozen=True, slots=True)
class StreamError:
    """The stream failed after it started: a sentence in our words and a stable code."""

    request_id: str
    code: FailureCode

    @property
    def message(self) -> str:
        return FAILURE_MESSAGES[self.code]


StreamEvent = StreamStarted | StreamRejected | StreamToken | StreamDone | StreamError

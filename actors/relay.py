"""TokenRelay: one per stream, between the scheduler and the HTTP response.

It turns token ids into text (held back while a character or a possible stop string is
incomplete), ends the request at a stop string, adds the timings, and hands ready events to the
response body. It runs in a long-lived nursery (actors/streams.py), not inside the response
generator, so a response that is torn down mid-``yield`` never leaves it half-run. When its
reader is gone (the stream handle closed its end, after it aborted the request: the one path a
disconnect takes) the relay just exits; when its reader stops reading for ``stall_timeout`` seconds, or a stop
string ends the text, the relay aborts the request itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import structlog
import trio

from actors.messages import (
    AbortReason,
    Admitted,
    Failed,
    Finished,
    PromptReused,
    Queued,
    Rejected,
    SchedulerEvent,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamRejected,
    StreamStarted,
    StreamToken,
    Timings,
    TokenOut,
    Usage,
)
from app.text.logprobs import LogprobSpeller, ShownLogprobs
from app.text.pieces import TextPiece, TokenText
from app.text.stop_strings import StopStringMatcher

log = structlog.get_logger("relay")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class TokenRelay:
    def __init__(
        self,
        request_id: str,
        received_at: float,
        prompt_tokens: int,
        events_in: trio.MemoryReceiveChannel[SchedulerEvent],
        events_out: trio.MemorySendChannel[StreamEvent],
        text: TokenText,
        stop: tuple[str, ...],
        abort: Callable[[str, AbortReason], None],
        *,
        token_bytes: Callable[[int], bytes],
        stall_timeout: float = math.inf,
        stop_applies_to: Callable[[str | None], bool] = lambda channel: True,
        single_call: bool = False,
    ) -> None:
        """``token_bytes``: the served model's (app.contract.model.ServedModel), to spell logprobs."""
        self.request_id = request_id
        self._received_at = received_at
        self._in = events_in
        self._out = events_out
        self._text = text
        self._speller = LogprobSpeller(token_bytes)
        # Logprobs of tokens not settled as text yet (a Harmony header may still turn out to be text).
        self._unsettled: dict[int, ShownLogprobs] = {}
        self._stops = StopStringMatcher(stop)
        self._stop_applies_to = stop_applies_to
        self._abort = abort
        self._stall_timeout = stall_timeout
        self._admitted_at: float | None = None
        self._first_token_at: float | None = None
        self._prompt_tokens = prompt_tokens
        self._cached_tokens = 0  # of them, those whose keys were reused (PromptReused)
        self._completion_tokens = 0
        self._stopped = False  # a stop string (or a second tool call) ended the request here
        self._single_call = single_call
        self._call_message: int | None = None  # the Harmony message of the first tool call

    async def run(self) -> None:
        async with self._in, self._out:
            try:
                async for event in self._in:
                    for out in self._translate(event):
                        await self._deliver(out)
                    if isinstance(event, Rejected | Finished | Failed):
                        return
                    if self._stopped:
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the reader is gone: its stream handle has aborted the request already
            except _Stalled:
                log.warning("stream_stalled", request_id=self.request_id, seconds=self._stall_timeout)
                self._abort(self.request_id, "stalled")
            except Exception:
                # A fault in turning tokens into text (a tokenizer bug, a token it cannot decode)
                # ends this request with an error; raised, it would stop every actor in the pipeline.
                log.exception("relay_failed", request_id=self.request_id)
                self._abort(self.request_id, "relay_error")
                failure = StreamError(self.request_id, "text_failed")
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    self._out.send_nowait(failure)  # else its reader sees the stream end: also an error

    async def _deliver(self, event: StreamEvent) -> None:
        with trio.move_on_after(self._stall_timeout) as scope:
            await self._out.send(event)
        if scope.cancelled_caught:
            raise _Stalled

    def _translate(self, event: SchedulerEvent) -> list[StreamEvent]:
        match event:
            case Queued():
                return [StreamStarted(self.request_id)]
            case Rejected():
                return [StreamRejected(self.request_id, event.status, event.message, event.retry_after)]
            case Admitted():
                self._admitted_at = event.at
                return []
            case PromptReused():
                self._cached_tokens = event.tokens
                return []
            case TokenOut():
                return self._on_token(event)
            case Finished():
                return [self._done(event.reason, event.completion_tokens, event.at)]
            case Failed():
                return [StreamError(self.request_id, event.code)]
        return []

    def _on_token(self, event: TokenOut) -> list[StreamEvent]:
        if self._first_token_at is None:
            self._first_token_at = event.at
        self._completion_tokens = event.index + 1
        piece = self._text.push(event.token_id, event.is_stop_token)
        if event.finish_reason is not None:
            tail = self._text.flush()
            text, shown, channel = piece.text + tail.text, piece.shown + tail.shown, piece.channel or tail.channel
            piece = dataclasses.replace(piece, text=text, channel=channel, shown=shown)
        own = None
        if event.logprobs is not None:
            own = self._unsettled[event.index] = self._speller.show(event.token_id, event.logprobs)
        settled = self._settle(piece.shown)
        if piece.recipient is not None and self._second_call(piece.message):
            # parallel_tool_calls false: the first call is whole; what would follow is not sent.
            self._abort(self.request_id, "single_call")
            self._stopped = True
            return [self._done("stop", self._completion_tokens, event.at)]
        text = piece.text
        # A tool call's arguments are not the answer: stop strings do not cut them.
        if piece.recipient is None and self._stop_applies_to(piece.channel):
            check = self._stops.push(text)
            text = check.text
            if check.stopped:
                # The scheduler may still be running this sequence: stop it, finish here.
                self._abort(self.request_id, "stop_string")
                self._stopped = True
                token = self._token(text, event, piece, own, settled)
                return [token, self._done("stop", self._completion_tokens, event.at)]
            if event.finish_reason is not None:
                text += self._stops.flush()
        return [self._token(text, event, piece, own, settled)]

    def _second_call(self, message: int) -> bool:
        """A tool-addressed message opens after another one, on a request that allows one call."""
        if not self._single_call:
            return False
        if self._call_message is None:
            self._call_message = message
        return message != self._call_message

    def _token(
        self,
        text: str,
        event: TokenOut,
        piece: TextPiece,
        own: ShownLogprobs | None,
        settled: tuple[ShownLogprobs, ...],
    ) -> StreamToken:
        cached = self._cached_tokens if event.index == 0 else None
        return StreamToken(
            text, event.token_id, event.index, piece.channel, own, settled, piece.recipient, piece.message, cached
        )

    def _settle(self, shown: tuple[int, ...]) -> tuple[ShownLogprobs, ...]:
        """The logprobs of the tokens now settled as text; those before them that were not are
        structure (positions settle in order), and are dropped."""
        if not self._unsettled or not shown:
            return ()
        settled = tuple(self._unsettled.pop(position) for position in shown if position in self._unsettled)
        for position in [p for p in self._unsettled if p < shown[-1]]:
            del self._unsettled[position]
        return settled

    def _done(self, reason: str, completion_tokens: int, at: float) -> StreamDone:
        admitted = self._admitted_at if self._admitted_at is not None else at
        first = self._first_token_at
        timings = Timings(
            queue_ms=_ms(admitted - self._received_at),
            prefill_ms=None if first is None else _ms(first - admitted),
            ttft_ms=None if first is None else _ms(first - self._received_at),
            e2e_ms=_ms(at - self._received_at),
        )
        usage = Usage(self._prompt_tokens, completion_tokens, self._cached_tokens)
        return StreamDone(self.request_id, reason, usage, timings)  # type: ignore[arg-type]


class _Stalled(Exception):
    """The client stopped reading for longer than the stall timeout."""

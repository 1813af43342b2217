"""TokenRelay between a scripted scheduler channel and a reader, in the event loop."""

from __future__ import annotations

import math

import pytest
import trio

from actors.messages import (
    AbortReason,
    Admitted,
    Finished,
    Queued,
    SchedulerEvent,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamStarted,
    StreamToken,
    TokenOut,
)
from actors.relay import TokenRelay
from app.text.pieces import TextPiece


class LetterText:
    """Token i is the letter chr(i); the stop token shows nothing."""

    def push(self, token_id: int, is_stop_token: bool) -> TextPiece:
        return TextPiece("" if is_stop_token else chr(token_id))

    def flush(self) -> TextPiece:
        return TextPiece("")


class BrokenText(LetterText):
    """Text that cannot decode the letter z, like a tokenizer meeting an id it has no bytes for."""

    def push(self, token_id: int, is_stop_token: bool) -> TextPiece:
        if chr(token_id) == "z":
            raise KeyError(token_id)
        return super().push(token_id, is_stop_token)


def make_relay(
    stop: tuple[str, ...] = (), stall_timeout: float = math.inf, text: LetterText | None = None
) -> tuple[
    TokenRelay,
    trio.MemorySendChannel[SchedulerEvent],
    trio.MemoryReceiveChannel[StreamEvent],
    list[tuple[str, AbortReason]],
]:
    to_relay, relay_in = trio.open_memory_channel[SchedulerEvent](100)
    relay_out, from_relay = trio.open_memory_channel[StreamEvent](2)
    aborts: list[tuple[str, AbortReason]] = []
    relay = TokenRelay(
        "r1",
        0.0,
        3,
        relay_in,
        relay_out,
        text or LetterText(),
        stop,
        lambda rid, why: aborts.append((rid, why)),
        token_bytes=lambda token_id: chr(token_id).encode(),
        stall_timeout=stall_timeout,
    )
    return relay, to_relay, from_relay, aborts


def script(text: str, finish: str = "length") -> list[SchedulerEvent]:
    events: list[SchedulerEvent] = [Queued("r1", 0.1), Admitted("r1", 0.2)]
    for i, ch in enumerate(text):
        last = i == len(text) - 1
        events.append(TokenOut("r1", ord(ch), i, 0.3 + i, finish if last else None))  # type: ignore[arg-type]
    events.append(Finished("r1", finish, 3, len(text), 0.3 + len(text)))  # type: ignore[arg-type]
    return events


async def run_relay(
    relay: TokenRelay,
    to_relay: trio.MemorySendChannel[SchedulerEvent],
    events: list[SchedulerEvent],
    from_relay: trio.MemoryReceiveChannel[StreamEvent],
) -> list[StreamEvent]:
    out: list[StreamEvent] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        for event in events:
            to_relay.send_nowait(event)
        to_relay.close()
        async for stream_event in from_relay:
            out.append(stream_event)
    return out


async def test_relay_frames_a_whole_stream_with_timings() -> None:
    relay, to_relay, from_relay, aborts = make_relay()
    out = await run_relay(relay, to_relay, script("hey"), from_relay)
    assert isinstance(out[0], StreamStarted)
    assert "".join(e.text for e in out if isinstance(e, StreamToken)) == "hey"
    done = out[-1]
    assert isinstance(done, StreamDone) and done.finish_reason == "length"
    assert done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 3
    assert done.timings.queue_ms == 200.0 and done.timings.ttft_ms == 300.0 and done.timings.prefill_ms == 100.0
    assert aborts == []


async def test_stop_string_ends_the_stream_and_aborts_the_sequence() -> None:
    relay, to_relay, from_relay, aborts = make_relay(stop=("lo w",))
    out = await run_relay(relay, to_relay, script("hello world"), from_relay)
    text = "".join(e.text for e in out if isinstance(e, StreamToken))
    assert text == "hel"
    done = out[-1]
    assert isinstance(done, StreamDone) and done.finish_reason == "stop"
    assert done.usage.completion_tokens == 7  # "hello w": up to the token that completed the match
    assert aborts == [("r1", "stop_string")]


async def test_text_held_for_a_possible_stop_string_is_flushed_at_the_end() -> None:
    relay, to_relay, from_relay, _ = make_relay(stop=("abc",))
    out = await run_relay(relay, to_relay, script("xxab"), from_relay)
    tokens = [e for e in out if isinstance(e, StreamToken)]
    assert [t.text for t in tokens] == ["x", "x", "", "ab"]


async def test_a_fault_in_the_text_fails_this_stream_with_an_error_and_stops_its_sequence() -> None:
    relay, to_relay, from_relay, aborts = make_relay(text=BrokenText())
    out = await run_relay(relay, to_relay, script("abzcd"), from_relay)  # run() returns: nothing raised
    assert "".join(e.text for e in out if isinstance(e, StreamToken)) == "ab"
    error = out[-1]
    assert isinstance(error, StreamError) and error.code == "text_failed"
    assert "KeyError" not in error.message and "122" not in error.message, "the exception's text stays in the log"
    assert aborts == [("r1", "relay_error")]


async def test_reader_gone_ends_the_relay_without_a_second_abort() -> None:
    """A reader goes only through its stream handle, which aborts the request before it closes its
    end: that is the one path a disconnect takes to the scheduler. The relay then just exits, and
    its input is closed, so the scheduler could not keep sending into it unnoticed."""
    relay, to_relay, from_relay, aborts = make_relay()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            to_relay.send_nowait(Queued("r1", 0.0))
            await from_relay.receive()
            from_relay.close()
            to_relay.send_nowait(Admitted("r1", 0.0))
            to_relay.send_nowait(TokenOut("r1", 65, 0, 0.1))
    assert aborts == []
    with pytest.raises(trio.BrokenResourceError):
        to_relay.send_nowait(TokenOut("r1", 66, 1, 0.2))


async def test_a_reader_that_stops_reading_is_aborted_after_the_stall_timeout(autojump_clock: object) -> None:
    relay, to_relay, from_relay, aborts = make_relay(stall_timeout=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        for event in script("a" * 20):
            to_relay.send_nowait(event)
        start = trio.current_time()
        await from_relay.receive()  # then never again
        while not aborts:
            await trio.sleep(0.5)
        assert 5.0 <= trio.current_time() - start <= 6.0
    assert aborts == [("r1", "stalled")]

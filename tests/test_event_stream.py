"""The one SSE loop (app/http/event_stream.py), with a recording framer: what every streaming
endpoint relies on, read from a channel that need not come from this request's relays."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from actors.choice_merge import ChoiceEvent
from actors.messages import StreamDone, StreamError, StreamEvent, StreamToken, Timings, Usage
from app.http.event_stream import ChoiceGroup, SseFramer, sse_body


class Recorder:
    """Frames each call as its own line, so the order of the loop's calls is the bytes' order."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def _say(self, line: str) -> list[bytes]:
        self.log.append(line)
        return [line.encode()]

    def opening(self) -> list[bytes]:
        return self._say("opening")

    def token(self, index: int, event: StreamToken) -> list[bytes]:
        return self._say(f"token {index} {event.text}")

    def done(self, index: int, event: StreamDone) -> list[bytes]:
        return self._say(f"done {index}")

    def error(self, event: StreamError) -> list[bytes]:
        return self._say(f"error {event.code}")

    def closing(self, complete: bool) -> list[bytes]:
        return self._say(f"closing complete={complete}")


def _done(index: int) -> StreamDone:
    return StreamDone(f"req-{index}", "stop", Usage(3, 1), Timings(0.0, None, None, 1.0))


async def _run(
    indexes: Sequence[int], events: Sequence[tuple[int, StreamEvent]], *, end_channel: bool = True
) -> tuple[list[str], list[int | None], list[bytes]]:
    log: list[str] = []
    stopped: list[int | None] = []
    send, receive = trio.open_memory_channel[ChoiceEvent](len(events) + 1)
    for index, event in events:
        send.send_nowait(ChoiceEvent(index, event))
    if end_channel:
        send.close()

    async def before_closing() -> None:
        log.append("hook")

    group = ChoiceGroup(receive, tuple(indexes), "req-0", stopped.append)
    framer: SseFramer = Recorder(log)
    with trio.fail_after(5):
        body = [data async for data in sse_body(group, framer, 60.0, before_closing)]
    return log, stopped, body


async def test_every_choice_ends_then_the_hook_runs_before_the_closing_bytes() -> None:
    events: list[tuple[int, StreamEvent]] = [(0, StreamToken("a", 1, 0)), (1, StreamToken("b", 2, 0))]
    events += [(1, _done(1)), (0, _done(0))]
    log, stopped, body = await _run([0, 1], events, end_channel=False)  # ends at the last end, not the channel's
    assert log == ["opening", "token 0 a", "token 1 b", "done 1", "done 0", "hook", "closing complete=True"]
    assert stopped == [] and body == [line.encode() for line in log if line != "hook"]


async def test_the_first_failure_stops_the_other_choices_and_ends_the_stream() -> None:
    events: list[tuple[int, StreamEvent]] = [(0, StreamToken("a", 1, 0)), (1, StreamError("req-1", "step_failed"))]
    events.append((0, _done(0)))
    log, stopped, _ = await _run([0, 1], events)
    assert log == ["opening", "token 0 a", "error step_failed", "hook", "closing complete=False"]
    assert stopped == [1]  # every choice but the one that failed


async def test_a_channel_that_ends_without_a_choice_s_end_is_a_lost_stream() -> None:
    log, stopped, _ = await _run([0], [(0, StreamToken("a", 1, 0))])
    assert log == ["opening", "token 0 a", "error stream_lost", "hook", "closing complete=False"]
    assert stopped == [None]  # all of them


async def test_a_quiet_stream_gets_keep_alive_comments(autojump_clock: trio.abc.Clock) -> None:
    send, receive = trio.open_memory_channel[ChoiceEvent](1)
    group = ChoiceGroup(receive, (0,), "req-0", lambda but: None)
    out: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def read() -> None:
            out.extend([data async for data in sse_body(group, Recorder([]), 15.0)])

        nursery.start_soon(read)
        await trio.sleep(31)
        await send.send(ChoiceEvent(0, _done(0)))
    assert out == [b"opening", b": keep-alive\n\n", b": keep-alive\n\n", b"done 0", b"closing complete=True"]

"""The streams of a request's choices, read as one: each event tagged with its choice, as it comes.

One pump task per stream forwards that stream's events to one channel. The pumps run in the
pipeline's nursery, as the relays run in a long-lived one: an HTTP response body is a generator,
and a generator cannot hold a nursery open across its yields. The merged channel is small, so a client that
reads slowly still holds its relays back (and their stall watch still sees it). A pump ends after
its stream's terminal event, when its stream is aborted (the handle closes its end), or when the
merged channel's reader has gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import trio

from actors.messages import StreamDone, StreamError, StreamEvent, StreamRejected
from actors.stream_handle import StreamHandle


@dataclass(frozen=True, slots=True)
class ChoiceEvent:
    index: int  # the choice's index in the response
    event: StreamEvent


async def pump(index: int, handle: StreamHandle, out: trio.MemorySendChannel[ChoiceEvent]) -> None:
    async with out:
        while True:
            try:
                event = await handle.next_event()
            except trio.EndOfChannel:
                event = StreamError(handle.request_id, "stream_lost")
            except trio.ClosedResourceError:
                return  # aborted: nobody reads this stream any more
            try:
                await out.send(ChoiceEvent(index, event))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the response is gone
            if isinstance(event, StreamDone | StreamError | StreamRejected):
                return


def merge(nursery: trio.Nursery, streams: Sequence[tuple[int, StreamHandle]]) -> trio.MemoryReceiveChannel[ChoiceEvent]:
    """One channel of every stream's events; it ends once every pump has ended. The reader must
    close it when it is done (a pump waiting to send would otherwise wait for ever)."""
    send, receive = trio.open_memory_channel[ChoiceEvent](len(streams))
    with send:
        for index, handle in streams:
            nursery.start_soon(pump, index, handle, send.clone())
    return receive

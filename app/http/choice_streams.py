"""The choices of one request (/generate's one, OpenAI's n per prompt): a stream each, opened
together, read as one.

Per prompt, choice 0 is opened first and the others name it as ``fork_from``: the scheduler then
prefills the prompt once and the others copy its keys. Every stream's abort is registered with
the request scope (start_stream), so a client that leaves stops all of them; if one cannot open,
those already opened are aborted and the refusal is the answer. Once open, their events come
through one merged channel (actors/choice_merge.py), in the order they arrive: a ChoiceGroup,
which the SSE loop (app/http/event_stream.py) or ``collect`` reads. The first choice to fail
ends the response: the others are aborted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from quart import request

from actors.messages import GenerationJob, StreamDone, StreamError, StreamStarted, StreamToken
from actors.stream_handle import StreamHandle
from app.http.context import ServerState
from app.http.errors import ApiError
from app.http.event_stream import ChoiceGroup
from app.http.request_scope import on_request_close
from app.http.streams import first_event, start_stream


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    job: GenerationJob
    handle: StreamHandle
    started: StreamStarted


def abort_all(handles: Iterable[StreamHandle]) -> None:
    for handle in handles:
        handle.abort("choice_failed")


async def open_choices(state: ServerState, groups: Sequence[Sequence[GenerationJob]]) -> list[Choice]:
    """Open every choice's stream (``groups``: per prompt, its choices' jobs, choice 0 first) and
    wait until each is queued. A refusal of any (429, 503) aborts the others and is raised."""
    opened: list[tuple[int, GenerationJob, StreamHandle]] = []
    try:
        for prompt_index, jobs in enumerate(groups):
            parent: str | None = None
            for j, job in enumerate(jobs):
                handle = start_stream(state, job, fork_from=parent)
                parent = parent or handle.request_id  # ours, never the client's X-Request-Id
                opened.append((prompt_index * len(jobs) + j, job, handle))
        return [Choice(index, job, handle, await first_event(handle)) for index, job, handle in opened]
    except ApiError:
        # A client that left is not this: its request's close aborts them, with its own reason.
        abort_all(handle for _, _, handle in opened)
        raise


def merged_events(state: ServerState, choices: Sequence[Choice]) -> ChoiceGroup:
    """The choices' events as one channel. It is closed when the request ends, however it ends,
    so that no pump waits on a response that will never read it."""
    events = state.pipeline.merge([(choice.index, choice.handle) for choice in choices])
    on_request_close(cast(dict[str, Any], request.scope), lambda reason: events.close())

    def stop(but: int | None) -> None:
        abort_all(choice.handle for choice in choices if choice.index != but)

    return ChoiceGroup(events, tuple(choice.index for choice in choices), choices[0].handle.request_id, stop)


async def collect(group: ChoiceGroup) -> list[tuple[int, list[StreamToken], StreamDone]]:
    """Every choice's (index, tokens, end), by index; the first failure is raised as the response."""
    tokens: dict[int, list[StreamToken]] = {index: [] for index in group.indexes}
    ends: dict[int, StreamDone] = {}
    with group.events:
        async for item in group.events:
            match item.event:
                case StreamToken() as token:
                    tokens[item.index].append(token)
                case StreamDone() as done:
                    ends[item.index] = done
                case StreamError() as error:
                    group.stop(item.index)
                    raise ApiError(500, error.message, code=error.code)
            if len(ends) == len(tokens):
                return [(index, tokens[index], ends[index]) for index in sorted(tokens)]
    group.stop(None)
    raise ApiError(500, "the generation stream ended without a result", code="stream_lost")

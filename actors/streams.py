"""Streams: opening a request's generation stream, and the nursery its relay runs in.

Made by the pipeline once the model and the scheduler are up (actors/pipeline.py owns that life).
Each generation's relay is started in this object's own nursery, as Hypercorn's ``worker_serve``
starts each connection's handler in its ``server_nursery``: open while the server serves; once it
closes, nothing new starts in it, its cancel scope gets the deadline, and leaving it waits for the
running relays to end on their own (or cuts them at the deadline). So draining counts nothing and
polls nothing: the nursery knows what still runs.

The pumps that merge a request's choices (actors/choice_merge.py) run in the pipeline's nursery,
which lives until the pipeline stops: they read what the relays wrote after the relays are done.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Sequence

import trio

from actors import choice_merge
from actors.choice_merge import ChoiceEvent
from actors.messages import GenerationJob, SchedulerEvent, StreamEvent, Submit
from actors.metrics import MetricsActor
from actors.metrics_events import RequestReceived
from actors.prompt_cache import PromptCache
from actors.relay import TokenRelay
from actors.scheduler import GpuScheduler
from actors.stream_counts import StreamCounts
from actors.stream_handle import StreamHandle
from app.batching.finish import AbortReason
from app.config import ServerConfig
from app.contract.model import ServedModel
from app.text.pieces import TextMode
from app.text.token_text import token_text

# Events a relay may hold for a client that reads slowly, before the relay itself waits.
RELAY_BUFFER_EVENTS = 256
# Seconds the relays get to say goodbye once they are told to end, before they are cancelled.
STOP_GRACE_SECONDS = 5.0


def _stop_applies_to(text_mode: TextMode) -> Callable[[str | None], bool]:
    # Stop strings end the answer; gpt-oss's reasoning (the analysis channel) is not the answer.
    if text_mode == "harmony":
        return lambda channel: channel != "analysis"
    return lambda channel: True


class StreamsClosed(RuntimeError):
    """The relays' nursery has closed (the server drains or stops): no generation starts."""


class Streams:
    def __init__(
        self,
        model: ServedModel,
        scheduler: GpuScheduler,
        cache: PromptCache | None,
        metrics: MetricsActor,
        config: ServerConfig,
        pumps: trio.Nursery,
    ) -> None:
        """``pumps``: where the merging pumps run (the pipeline's nursery)."""
        self._model = model
        self._scheduler = scheduler
        self._cache = cache
        self._metrics = metrics
        self._config = config
        self._pumps = pumps
        self._relays: trio.Nursery | None = None
        self._closing = trio.Event()
        self._closed = trio.Event()
        # HTTP requests with a stream open (cache-served ones included), in all and per tenant.
        self._counts = StreamCounts(config.max_streams, config.max_streams_per_key)

    @property
    def open(self) -> int:
        return self._counts.total

    @property
    def relays(self) -> int:
        """Generations with a relay running (several HTTP streams may share one)."""
        return len(self._relays.child_tasks) if self._relays is not None else 0

    async def run(self, *, task_status: trio.TaskStatus[Streams] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as relays:
                self._relays = relays
                task_status.started(self)
                await self._closing.wait()
                # From here the nursery's exit waits for the running relays (cut at its deadline).
        finally:
            self._relays = None
            self._closed.set()

    async def close(
        self, timeout: float = 0.0, end_the_rest: Callable[[], None] = lambda: None, grace: float = STOP_GRACE_SECONDS
    ) -> None:
        """Start no more generations; give the running ones ``timeout`` seconds to finish, then
        call ``end_the_rest`` (the scheduler ends them: their relays pass that on) and give them
        ``grace`` more seconds; the relays still running then are cancelled."""
        if self._relays is not None:
            scope = self._relays.cancel_scope
            scope.deadline = min(scope.deadline, trio.current_time() + timeout + grace)
        self._closing.set()
        with trio.move_on_after(timeout):
            await self._closed.wait()
        if not self._closed.is_set():
            end_the_rest()
        await self._closed.wait()

    def open_stream(self, job: GenerationJob, fork_from: str | None = None) -> StreamHandle:
        """Start a request's stream: through the prompt cache when it is cacheable, else straight
        to the scheduler. Synchronous: nothing here can block.

        ``fork_from``: the request id of an earlier stream of ours with the same prompt (choice 0
        of the same request). The scheduler prefills the prompt once for both if that one is in
        its batch; if not (a cache hit, or already ended), this one prefills on its own."""
        if self._relays is None or self._closing.is_set():
            raise StreamsClosed("no generation starts any more")
        self._counts.check(job.tenant)  # TooManyStreams past --max-streams or --max-streams-per-key
        request_id = f"req-{uuid.uuid4().hex}"  # ours, always unique: the key every actor uses
        shown_id = job.client_request_id or request_id
        abort: Callable[[AbortReason], None]
        if job.cacheable and self._cache is not None:
            cache, key = self._cache, job.cache_key
            capacity = job.params.max_tokens + 8
            send, receive = trio.open_memory_channel[StreamEvent](capacity)
            start = functools.partial(self._start_generation, job, request_id, fork_from=fork_from)
            subscriber = cache.open(key, request_id, send, job.received_at, capacity, start)
            abort = lambda reason: cache.leave(key, subscriber)  # noqa: E731
        else:
            send, receive = trio.open_memory_channel[StreamEvent](RELAY_BUFFER_EVENTS)
            abort = self._start_generation(job, request_id, send, fork_from=fork_from)
        self._metrics.report(
            RequestReceived(
                request_id, len(job.prompt), job.cache_key, job.prompt_version, job.cacheable, job.client_request_id
            )
        )
        self._counts.open(job.tenant)
        closed = functools.partial(self._counts.close, job.tenant)
        return StreamHandle(request_id, receive, abort, self._metrics.report, closed, shown_id=shown_id)

    def merge(self, streams: Sequence[tuple[int, StreamHandle]]) -> trio.MemoryReceiveChannel[ChoiceEvent]:
        """Several streams' events as one channel, each tagged with its index (the choices of one
        request); the pumps that feed it run in the pipeline's nursery (actors/choice_merge.py)."""
        return choice_merge.merge(self._pumps, streams)

    def _start_generation(
        self,
        job: GenerationJob,
        request_id: str,
        out: trio.MemorySendChannel[StreamEvent],
        *,
        fork_from: str | None = None,
    ) -> Callable[[AbortReason], None]:
        """Start a relay writing to ``out`` and submit the job; returns how to abort it."""
        model, scheduler, relays = self._model, self._scheduler, self._relays
        if relays is None:  # the prompt cache starts a miss's generation later, maybe after the close
            raise StreamsClosed("no generation starts any more")
        # Room for every event the scheduler can send this request: it never waits on a relay.
        to_relay, relay_in = trio.open_memory_channel[SchedulerEvent](job.params.max_tokens + 8)
        relay = TokenRelay(
            request_id,
            job.received_at,
            len(job.prompt),
            relay_in,
            out,
            token_text(job.text_mode, model.decode),
            job.params.stop,
            scheduler.abort,
            token_bytes=model.token_bytes,
            stall_timeout=self._config.stall_timeout if self._config.stall_timeout > 0 else math.inf,
            stop_applies_to=_stop_applies_to(job.text_mode),
            single_call=job.single_call,
        )
        relays.start_soon(relay.run)
        scheduler.submit(
            Submit(
                request_id,
                job.prompt,
                job.params,
                model.stop_token_ids,
                job.received_at,
                to_relay,
                job.deadline,
                fork_from,
            )
        )
        return functools.partial(scheduler.abort, request_id)

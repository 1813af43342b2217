"""The pipeline: starts the actors, loads the model, and opens one stream per request.

Structure (all in one nursery, started with ``await nursery.start(pipeline.run)``): the metrics
actor and the prompt cache, then the model load in a worker thread, then the GPU scheduler;
relays are started in the same nursery, one per generation, so none lives inside an HTTP
response generator. ``stop`` ends them in order: the scheduler first (it fails what is left, and
the relays pass that on), then the cache, then whatever is still running is cancelled.
"""

from __future__ import annotations

import functools
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import structlog
import trio

from actors import choice_merge
from actors.cached_response import CachedResponse
from actors.choice_merge import ChoiceEvent
from actors.messages import GenerationJob, SchedulerEvent, StreamEvent, Submit
from actors.metrics import MetricsActor
from actors.metrics_events import ModelLoaded, RequestReceived
from actors.prometheus_series import GpuMemoryProbe, PrometheusSeries
from actors.prompt_cache import PromptCache
from actors.relay import TokenRelay
from actors.scheduler import GpuScheduler
from actors.shared_cache import SharedCache
from actors.step_thread import StepCaller
from actors.stream_counts import StreamCounts
from actors.stream_handle import StreamHandle
from app.batching.finish import AbortReason
from app.cache.store import ResponseStore
from app.config import ServerConfig
from app.contract.model import ServedModel
from app.text.pieces import TextMode
from app.text.token_text import token_text

log = structlog.get_logger("pipeline")

State = Literal["loading", "ready", "draining", "failed"]
# Events a relay may hold for a client that reads slowly, before the relay itself waits.
RELAY_BUFFER_EVENTS = 256
# Seconds ``stop`` gives the scheduler and the relays to say goodbye before it cancels them.
STOP_GRACE_SECONDS = 5.0


def _stop_applies_to(text_mode: TextMode) -> Callable[[str | None], bool]:
    # Stop strings end the answer; gpt-oss's reasoning (the analysis channel) is not the answer.
    if text_mode == "harmony":
        return lambda channel: channel != "analysis"
    return lambda channel: True


class NotReadyError(RuntimeError):
    def __init__(self, state: State, detail: str = "") -> None:
        super().__init__(detail or f"the server is {state}")
        self.state = state


class Pipeline:
    def __init__(
        self,
        load: Callable[[], ServedModel],
        config: ServerConfig,
        *,
        step_caller: StepCaller | None = None,
        gpu_memory: GpuMemoryProbe | None = None,
        on_fatal: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared_cache: Callable[[ServedModel], SharedCache] | None = None,
    ) -> None:
        """``shared_cache``: the prompt cache's tier that replicas share (Redis), made for the
        loaded model (its identity is part of every shared key)."""
        self._load = load
        self._shared_cache = shared_cache
        self.config = config
        self._step_caller = step_caller
        self._on_fatal = on_fatal
        self.clock = clock
        self.metrics = MetricsActor(PrometheusSeries(gpu_memory))
        self.cache: PromptCache | None = None
        self.state: State = "loading"
        self.failure: str | None = None
        self.model: ServedModel | None = None
        self.scheduler: GpuScheduler | None = None
        self.started_at = clock()
        self._nursery: trio.Nursery | None = None
        self._scheduler_done, self._cache_done = trio.Event(), trio.Event()
        self._relays = 0
        self._streams = StreamCounts(config.max_streams, config.max_streams_per_key)

    @property
    def active_relays(self) -> int:
        """Generations with a relay running (several HTTP streams may share one)."""
        return self._relays

    @property
    def active_streams(self) -> int:
        """HTTP requests with a generation stream open, cache-served ones included."""
        return self._streams.total

    @property
    def task_count(self) -> int:
        """Tasks in the pipeline's nursery: the actors plus one per live relay."""
        return len(self._nursery.child_tasks) if self._nursery is not None else 0

    async def run(
        self, *, wait_for_model: bool = False, task_status: trio.TaskStatus[Pipeline] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the actors until stopped. An actor that dies takes the pipeline down: every open
        stream ends with an error event (its relay is cancelled, so its handle sees the stream
        end), /health says ``failed``, and ``on_fatal`` hears it, so that the process can exit
        non-zero and be restarted rather than answer 500s while looking healthy."""
        started = False

        def signal_started(pipeline: Pipeline) -> None:
            nonlocal started
            started = True
            task_status.started(pipeline)

        try:
            await self._run(wait_for_model, signal_started)
        except Exception as error:
            if not started:
                raise  # start-up fails with it
            self.state = "failed"
            self.failure = "an actor of the pipeline failed: this server cannot serve any more"
            log.error("pipeline_failed", error=repr(error), exc_info=error)
            if self._on_fatal is not None:
                self._on_fatal(self.failure)

    async def _run(self, wait_for_model: bool, started: Callable[[Pipeline], None]) -> None:
        config = self.config
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.metrics.run)
            if config.cache_max_entries > 0:
                store = ResponseStore[CachedResponse](config.cache_max_entries, config.cache_max_bytes)
                cache = PromptCache(store, self.metrics.sender(), clock=self.clock)
                self.cache = await nursery.start(self._run_until_done, cache.run, self._cache_done)
            if not wait_for_model:
                started(self)
            try:
                model = await trio.to_thread.run_sync(self._load)
            except Exception as error:  # any load failure: say why, in one line
                self.state = "failed"
                self.failure = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                log.error("model_load_failed", error=self.failure)
                if wait_for_model:
                    raise
                if self._on_fatal is not None:
                    self._on_fatal(self.failure)
                return
            self.model = model
            if self.cache is not None and self._shared_cache is not None:
                self.cache.share(self._shared_cache(model))
            scheduler = GpuScheduler(
                model.runner,
                config.profile,
                model.max_context,
                self.metrics.sender(),
                step_caller=self._step_caller,
                clock=self.clock,
            )
            self.scheduler = await nursery.start(self._run_until_done, scheduler.run, self._scheduler_done)
            nursery.start_soon(self._watch_steps, scheduler)
            loaded = ModelLoaded(
                model.model_id,
                model.model_size,
                model.dtype,
                model.device,
                config.profile.name,
                config.profile.max_batch_size,
            )
            self.metrics.report(loaded)
            self.state = "ready"
            log.info("model_ready", model=model.model_id, device=model.device, dtype=model.dtype)
            if wait_for_model:
                started(self)

    @staticmethod
    async def _run_until_done(
        run: Callable[..., Awaitable[None]], done: trio.Event, *, task_status: trio.TaskStatus[Any]
    ) -> None:
        try:
            await run(task_status=task_status)
        finally:
            done.set()

    async def _watch_steps(self, scheduler: GpuScheduler) -> None:
        """Log a step that runs past --step-timeout, once per step (/health reads the same clock)."""
        bound = self.config.step_timeout
        reported: float | None = None
        while True:
            await trio.sleep(min(1.0, bound / 4))
            since = scheduler.busy_since
            if since is not None and since != reported and self.clock() - since > bound:
                reported = since
                log.error("step_stalled", seconds=round(self.clock() - since, 1), bound_s=bound)

    def begin_drain(self) -> None:
        if self.state == "ready":
            self.state = "draining"

    async def drain(self, timeout: float) -> None:
        """Refuse new work; let running streams finish for up to ``timeout`` seconds, then end
        the rest with finish_reason ``shutdown`` and give their relays a moment to say so."""
        self.begin_drain()
        scheduler = self.scheduler
        if scheduler is None:
            return
        with trio.move_on_after(timeout):
            while scheduler.stats.running or scheduler.stats.waiting or self._relays:
                await trio.sleep(0.05)
        scheduler.abort_all("shutdown")
        with trio.move_on_after(STOP_GRACE_SECONDS):
            while self._relays:
                await trio.sleep(0.02)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """End the actors in order, each after the one that feeds it: the scheduler fails what it
        still holds and its relays pass that on; then the prompt cache; after ``grace`` seconds at
        most, whatever still runs is cancelled."""
        with trio.move_on_after(grace):
            if self.scheduler is not None:
                self.scheduler.close()
                await self._scheduler_done.wait()
            while self._relays:
                await trio.sleep(0.01)
            if self.cache is not None:
                self.cache.close()
                await self._cache_done.wait()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def open_stream(self, job: GenerationJob, fork_from: str | None = None) -> StreamHandle:
        """Start a request's stream: through the prompt cache when it is cacheable, else straight
        to the scheduler. Synchronous: nothing here can block.

        ``fork_from``: the request id of an earlier stream of ours with the same prompt (choice 0
        of the same request). The scheduler prefills the prompt once for both if that one is in
        its batch; if not (a cache hit, or already ended), this one prefills on its own."""
        if self.state != "ready" or self.model is None or self.scheduler is None or self._nursery is None:
            raise NotReadyError(self.state, self.failure or "")
        self._streams.check(job.tenant)  # TooManyStreams past --max-streams or --max-streams-per-key
        request_id = f"req-{uuid.uuid4().hex}"  # ours, always unique: the key every actor uses
        shown_id = job.client_request_id or request_id
        abort: Callable[[AbortReason], None]
        if job.cacheable and self.cache is not None:
            cache, key = self.cache, job.cache_key
            capacity = job.params.max_tokens + 8
            send, receive = trio.open_memory_channel[StreamEvent](capacity)
            start = functools.partial(self._start_generation, job, request_id, fork_from=fork_from)
            subscriber = cache.open(key, request_id, send, job.received_at, capacity, start)
            abort = lambda reason: cache.leave(key, subscriber)  # noqa: E731
        else:
            send, receive = trio.open_memory_channel[StreamEvent](RELAY_BUFFER_EVENTS)
            abort = self._start_generation(job, request_id, send, fork_from=fork_from)
        self.metrics.report(
            RequestReceived(
                request_id, len(job.prompt), job.cache_key, job.prompt_version, job.cacheable, job.client_request_id
            )
        )
        self._streams.open(job.tenant)
        closed = functools.partial(self._streams.close, job.tenant)
        return StreamHandle(request_id, receive, abort, self.metrics.report, closed, shown_id=shown_id)

    def merge(self, streams: Sequence[tuple[int, StreamHandle]]) -> trio.MemoryReceiveChannel[ChoiceEvent]:
        """Several streams' events as one channel, each tagged with its index (the choices of one
        request); the pumps that feed it run in this nursery (actors/choice_merge.py)."""
        if self._nursery is None:
            raise NotReadyError(self.state, self.failure or "")
        return choice_merge.merge(self._nursery, streams)

    def _start_generation(
        self,
        job: GenerationJob,
        request_id: str,
        out: trio.MemorySendChannel[StreamEvent],
        *,
        fork_from: str | None = None,
    ) -> Callable[[AbortReason], None]:
        """Start a relay writing to ``out`` and submit the job; returns how to abort it."""
        model, scheduler, nursery = self.model, self.scheduler, self._nursery
        if model is None or scheduler is None or nursery is None:
            raise NotReadyError(self.state, self.failure or "")
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
            stall_timeout=self.config.stall_timeout if self.config.stall_timeout > 0 else math.inf,
            stop_applies_to=_stop_applies_to(job.text_mode),
            single_call=job.single_call,
        )
        nursery.start_soon(self._run_relay, relay)
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

    async def _run_relay(self, relay: TokenRelay) -> None:
        self._relays += 1
        try:
            await relay.run()
        finally:
            self._relays -= 1

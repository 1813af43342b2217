"""The pipeline's life: it starts the actors, loads the model, drains and stops.

Structure (one nursery, started with ``await nursery.start(pipeline.run)``): the metrics actor
and the prompt cache, then the model load in a worker thread, then the GPU scheduler, then
Streams (actors/streams.py), which opens each request's stream and runs its relay in a nursery of
its own, so none lives inside an HTTP response generator. ``drain`` closes that nursery with the
drain deadline; ``stop`` ends the actors in order: the scheduler first (it fails what is left, and
the relays pass that on), then the cache, then whatever is still running is cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

import structlog
import trio

from actors.cached_response import CachedResponse
from actors.choice_merge import ChoiceEvent
from actors.messages import GenerationJob
from actors.metrics import MetricsActor
from actors.metrics_events import ModelLoaded
from actors.prometheus_series import GpuMemoryProbe, PrometheusSeries
from actors.prompt_cache import PromptCache
from actors.scheduler import GpuScheduler
from actors.shared_cache import SharedCache
from actors.step_thread import StepCaller
from actors.stream_handle import StreamHandle
from actors.streams import STOP_GRACE_SECONDS, Streams
from app.cache.store import ResponseStore
from app.config import ServerConfig
from app.contract.failures import first_line
from app.contract.model import ServedModel

log = structlog.get_logger("pipeline")

State = Literal["loading", "ready", "draining", "failed"]


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
        self.streams: Streams | None = None  # once the model is up
        self._nursery: trio.Nursery | None = None
        self._cache_done = trio.Event()

    @property
    def active_relays(self) -> int:
        """Generations with a relay running (several HTTP streams may share one)."""
        return self.streams.relays if self.streams is not None else 0

    @property
    def active_streams(self) -> int:
        """HTTP requests with a generation stream open, cache-served ones included."""
        return self.streams.open if self.streams is not None else 0

    @property
    def task_count(self) -> int:
        """Tasks in the pipeline's nursery (the actors, the merging pumps) plus one per live relay."""
        return (len(self._nursery.child_tasks) if self._nursery is not None else 0) + self.active_relays

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
                self.cache = await nursery.start(self._run_cache, cache)
            if not wait_for_model:
                started(self)
            try:
                model = await trio.to_thread.run_sync(self._load)
            except Exception as error:  # any load failure: say why, in one line
                self.state = "failed"
                self.failure = first_line(error)
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
            self.scheduler = await nursery.start(scheduler.run)
            nursery.start_soon(self._watch_steps, scheduler)
            streams = Streams(model, scheduler, self.cache, self.metrics, config, pumps=nursery)
            self.streams = await nursery.start(streams.run)
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

    async def _run_cache(self, cache: PromptCache, *, task_status: trio.TaskStatus[PromptCache]) -> None:
        # stop waits for its end: it hands on what the relays left it before anything is cancelled
        try:
            await cache.run(task_status=task_status)
        finally:
            self._cache_done.set()

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

    async def drain(self, timeout: float, grace: float = STOP_GRACE_SECONDS) -> None:
        """Refuse new work; let running streams finish for up to ``timeout`` seconds, then end
        the rest with finish_reason ``shutdown`` and give their relays ``grace`` seconds to say
        so (a relay whose reader does not take it by then is cancelled)."""
        self._refuse_work()
        if self.streams is not None and self.scheduler is not None:
            scheduler = self.scheduler
            await self.streams.close(timeout, lambda: scheduler.abort_all("shutdown"), grace)

    def _refuse_work(self) -> None:
        if self.state == "ready":
            self.state = "draining"

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """End the actors in order, each after the one that feeds it: the scheduler fails what it
        still holds and its relays pass that on; then the prompt cache; after ``grace`` seconds at
        most, whatever still runs is cancelled."""
        self._refuse_work()
        with trio.move_on_after(grace):
            if self.scheduler is not None:
                self.scheduler.close()
            if self.streams is not None:
                await self.streams.close(grace=grace)
            if self.cache is not None:
                self.cache.close()
                await self._cache_done.wait()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def open_stream(self, job: GenerationJob, fork_from: str | None = None) -> StreamHandle:
        """A request's stream (Streams.open_stream), while the pipeline is ready."""
        if self.state != "ready" or self.streams is None:
            raise NotReadyError(self.state, self.failure or "")
        return self.streams.open_stream(job, fork_from)

    def merge(self, streams: Sequence[tuple[int, StreamHandle]]) -> trio.MemoryReceiveChannel[ChoiceEvent]:
        """Several streams' events as one channel (Streams.merge)."""
        if self.streams is None:
            raise NotReadyError(self.state, self.failure or "")
        return self.streams.merge(streams)

"""GpuScheduler: the actor that applies the batch policy and drives the model runner.

Loop: take Submit/Abort messages, let the batch (app/batching, pure) decide what joins and what
the next step is, run that trip (actors/trip.py: rows freed, joiners added, ONE prefill, decode
or mixed step) in a worker thread, and send what came of it to each request's relay with
``send_nowait``. Only this actor touches the runner, and only from that thread, one trip at a
time, so no lock is needed; aborts that arrive during a step are applied before its tokens are
delivered, and their rows are freed before the next step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable

import structlog
import trio

from actors.messages import (
    Abort,
    AbortAll,
    Admitted,
    Failed,
    Finished,
    PromptReused,
    Queued,
    Rejected,
    SchedulerEvent,
    SchedulerMessage,
    Submit,
    TokenOut,
)
from actors.metrics_events import (
    FirstToken,
    MetricsEvent,
    PrefixCacheState,
    QueueState,
    RequestAdmitted,
    RequestFailed,
    RequestFinished,
    RequestQueued,
    RequestRejected,
    StepCompleted,
)
from actors.step_thread import StepCaller, thread_step_caller
from actors.trip import run_trip
from app.batching.admission import arrival_wait
from app.batching.batch import Batch, Ended, Refused, SchedulerStats, Tracked, Work
from app.batching.finish import AbortReason
from app.config import Profile
from app.contract.failures import FAILURE_MESSAGES, FailureCode
from app.contract.step import PrefixCacheStats, StepBackend, StepPlan, StepResult

log = structlog.get_logger("scheduler")
Events = trio.MemorySendChannel[SchedulerEvent]


class GpuScheduler:
    def __init__(
        self,
        backend: StepBackend,
        profile: Profile,
        max_context: int,
        metrics: trio.MemorySendChannel[MetricsEvent],
        *,
        step_caller: StepCaller | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._profile = profile
        self._metrics = metrics
        self._call = step_caller or thread_step_caller()
        self._clock = clock
        self._inbox_send, self._inbox = trio.open_memory_channel[SchedulerMessage](math.inf)
        self._batch: Batch[Events] = Batch(profile, max_context)
        self._closed = False
        self.stats = SchedulerStats()
        self._prefix_stats: PrefixCacheStats | None = None  # as last sent to the metrics
        # For the watchdog and /health: since when the worker thread has been on this trip (None
        # between trips), and when the last step finished.
        self.busy_since: float | None = None
        self.last_step_at: float | None = None

    # -- the handle other tasks use ------------------------------------------------------------
    def submit(self, message: Submit) -> None:
        self._send(message)

    def abort(self, request_id: str, reason: AbortReason) -> None:
        """Synchronous and idempotent: safe in a cancelled task's ``finally``."""
        self._send(Abort(request_id, reason, self._clock(), self._batch.steps))

    def abort_all(self, reason: AbortReason) -> None:
        self._send(AbortAll(reason, self._clock(), self._batch.steps))

    def close(self) -> None:
        self._inbox_send.close()

    def _send(self, message: SchedulerMessage) -> None:
        try:
            self._inbox_send.send_nowait(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if isinstance(message, Submit):
                rejected = Rejected(message.request_id, 503, "the server is shutting down", None, self._clock())
                self._emit(message.events, rejected)
                message.events.close()

    # -- the actor -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[GpuScheduler] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._inbox:
            task_status.started(self)
            while True:
                if self._batch.idle:
                    await self._wait_for_work()
                self._take_messages()
                if self._closed:
                    break
                self._end_all(self._batch.abort_expired(self._clock()))
                work = self._batch.take_work()
                if work:
                    await self._take_trip(work)
                self._publish_stats()
            self._fail_everything()

    async def _wait_for_work(self) -> None:
        """Nothing to do: sleep until a message or the nearest deadline; then, for an idle batch,
        the arrival window."""
        deadline = self._batch.next_deadline()
        # move_on_at takes trio's clock; deadlines are on ours: convert the nearest one.
        wake = math.inf if deadline is None else trio.current_time() + max(0.0, deadline - self._clock())
        with trio.move_on_at(wake):
            try:
                self._handle(await self._inbox.receive())
            except trio.EndOfChannel:
                self._closed = True
                return
        if wait := arrival_wait(len(self._batch.waiting), len(self._batch.running), self._profile):
            await trio.sleep(wait)  # the others come in meanwhile

    def _take_messages(self) -> None:
        """Handle every message waiting; once the inbox is closed the loop ends after this trip."""
        while not self._closed:
            try:
                message = self._inbox.receive_nowait()
            except trio.WouldBlock:
                return
            except trio.EndOfChannel:
                self._closed = True
                return
            self._handle(message)

    def _handle(self, message: SchedulerMessage) -> None:
        match message:
            case Submit():
                self._on_submit(message)
            case Abort():
                now = self._clock()
                self._end(self._batch.abort(message.request_id, message.reason, message.at, message.steps, now))
            case AbortAll():
                self._end_all(self._batch.abort_all(message.reason, message.at, message.steps, self._clock()))

    def _on_submit(self, submit: Submit) -> None:
        now = self._clock()
        request = Tracked(
            submit.request_id,
            submit.prompt,
            submit.params,
            submit.stop_token_ids,
            submit.received_at,
            submit.deadline,
            submit.events,
            submit.fork_from,
        )
        placed = self._batch.offer(request)
        if isinstance(placed, Refused):
            rejected = Rejected(submit.request_id, 429, "the waiting queue is full", placed.retry_after, now)
            self._emit(submit.events, rejected)
            submit.events.close()
            self._metric(RequestRejected(submit.request_id, 429, "queue_full"))
            return
        self._emit(submit.events, Queued(submit.request_id, now))
        self._metric(RequestQueued(submit.request_id, len(submit.prompt)))
        log.debug("queued", request_id=submit.request_id, position=placed)

    # -- a trip to the worker thread ---------------------------------------------------------------
    async def _take_trip(self, work: Work[Events]) -> None:
        now = self._clock()
        for request in work.joins:
            self._emit(request.reply, Admitted(request.request_id, now))
            self._metric(RequestAdmitted(request.request_id, now - request.received_at))
        self.busy_since = self._clock()
        try:
            trip = await self._call(functools.partial(run_trip, self._backend, work))
        except Exception as error:  # one bad step must not take the server down
            self._report_freed(work.releases)
            failed = self._batch.fail_step(work)
            log.error("step_failed", error=repr(error), requests=[r.request_id for r in failed])
            for request in failed:
                self._fail(request, "step_failed", error)
            return
        finally:
            self.busy_since = None
            if work.plan is not None:
                self.last_step_at = self._clock()
        self._note_starts(work.joins, trip.started)
        self._publish_prefix_cache(trip.prefix_stats)
        self._report_freed(work.releases)
        if trip.result is None or work.plan is None:
            return
        self._take_messages()  # aborts that came in during the step drop its tokens for them
        self._deliver(work.plan, trip.result)

    def _deliver(self, plan: StepPlan, result: StepResult) -> None:
        now = self._clock()
        outcome = self._batch.apply_step(plan, result, now)
        for request, code in outcome.failed:
            self._fail(request, code)
        for d in outcome.deliveries:
            request = d.request
            if d.first:
                self._metric(FirstToken(request.request_id, now - request.received_at))
            token = TokenOut(request.request_id, d.token, d.index, now, d.finish, d.is_stop_token, d.logprobs)
            self._emit(request.reply, token)
            if d.finish is not None:
                self._finish(Ended(request, d.finish, now))
        step = StepCompleted(
            result.kind,
            result.batch,
            result.new_tokens,
            result.produced,
            result.seconds,
            tuple(outcome.gaps),
            prompt_tokens=result.prefilled,
        )
        self._metric(step)

    # -- endings ---------------------------------------------------------------------------------
    def _end(self, ended: Ended[Events] | None) -> None:
        if ended is not None:
            self._finish(ended)

    def _end_all(self, endings: list[Ended[Events]]) -> None:
        for ended in endings:
            self._finish(ended)

    def _finish(self, ended: Ended[Events]) -> None:
        """The request's terminal event; its metrics event too, unless its row is still to be
        freed (an abort of a running request: that one comes with the teardown, from ``apply_freed``)."""
        request = ended.request
        finished = Finished(request.request_id, ended.reason, len(request.prompt), request.generated, ended.at)
        self._emit(request.reply, finished)
        request.reply.close()  # the terminal event: the relay's loop ends after it
        if not ended.row_held:
            self._finished_metric(ended)
        log.debug("finished", request_id=request.request_id, reason=ended.reason, tokens=request.generated)

    def _report_freed(self, released: list[str]) -> None:
        for ended in self._batch.apply_freed(released, self._clock()):
            self._finished_metric(ended)

    def _finished_metric(self, ended: Ended[Events]) -> None:
        request, teardown = ended.request, ended.teardown
        self._metric(
            RequestFinished(
                request.request_id,
                ended.reason,
                len(request.prompt),
                request.generated,
                ended.at - request.received_at,
                teardown_seconds=None if teardown is None else teardown.seconds,
                teardown_steps=None if teardown is None else teardown.steps,
                abort_reason=None if teardown is None else teardown.reason,
            )
        )

    def _fail(self, request: Tracked[Events], code: FailureCode, error: BaseException | None = None) -> None:
        """Its client hears the code (our words); the metrics and the log get the exception too."""
        self._emit(request.reply, Failed(request.request_id, code, self._clock()))
        request.reply.close()
        detail = FAILURE_MESSAGES[code] if error is None else repr(error)
        self._metric(RequestFailed(request.request_id, code if error is None else type(error).__name__, detail))

    def _fail_everything(self) -> None:
        for request in self._batch.clear():
            self._fail(request, "scheduler_stopped")

    def _note_starts(self, joins: list[Tracked[Events]], started: dict[str, int]) -> None:
        """The joiners' prompt tokens already in their rows: only the rest is prefilled, and their
        usage says how many were reused."""
        self._batch.apply_starts(started)
        now = self._clock()
        for request in joins:
            if cached := started.get(request.request_id, 0):
                self._emit(request.reply, PromptReused(request.request_id, cached, now))

    def _publish_prefix_cache(self, now: PrefixCacheStats | None) -> None:
        if now is not None and now != self._prefix_stats:
            self._prefix_stats = now
            self._metric(PrefixCacheState(now))

    def _publish_stats(self) -> None:
        stats = self._batch.stats()
        if (stats.running, stats.waiting) != (self.stats.running, self.stats.waiting):
            self._metric(QueueState(stats.running, stats.waiting))
        self.stats = stats

    # -- sending without ever waiting --------------------------------------------------------------
    def _emit(self, channel: Events, event: SchedulerEvent) -> None:
        try:
            channel.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Nobody can receive this request's tokens any more (its relay is gone): free its row.
            self._abort_now(event.request_id, "client_disconnect")
        except trio.WouldBlock:
            log.error("event_channel_full", request_id=event.request_id)
            self._abort_now(event.request_id, "stalled")

    def _abort_now(self, request_id: str, reason: AbortReason) -> None:
        now = self._clock()
        self._end(self._batch.abort(request_id, reason, now, self._batch.steps, now))

    def _metric(self, event: MetricsEvent) -> None:
        # Metrics must never hold up generation: a metrics actor that is gone loses the event.
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._metrics.send_nowait(event)

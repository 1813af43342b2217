"""GpuScheduler: the actor that owns the waiting queue, the running batch and the model runner.

Loop: take Submit/Abort messages, admit what fits, run ONE prefill or decode step in a worker
thread, send each new token to its request's channel with ``send_nowait``, retire what finished.
Only this actor touches the runner, and only between steps, so no lock is needed; aborts that
arrive during a step are honoured before the next one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import structlog
import trio

from actors.batch_policy import (
    BatchSettings,
    DecodePlan,
    PrefillPlan,
    SequenceView,
    StepPlan,
    admit_count,
    plan_step,
)
from actors.messages import (
    Abort,
    AbortAll,
    AbortReason,
    Admitted,
    Failed,
    Finished,
    FinishReason,
    FirstToken,
    MetricsEvent,
    Queued,
    QueueState,
    Rejected,
    RequestAdmitted,
    RequestFailed,
    RequestFinished,
    RequestQueued,
    RequestRejected,
    SchedulerEvent,
    SchedulerMessage,
    StepCompleted,
    Submit,
    TokenOut,
)
from app.engine.errors import StepOutOfMemory
from app.engine.params import SamplingParams
from app.engine.runner import PrefillChunk, StepResult

log = structlog.get_logger("scheduler")
T = TypeVar("T")

DEGRADED_AFTER_FAILED_STEPS = 3
ABORT_FINISH: dict[AbortReason, FinishReason] = {
    "client_disconnect": "cancelled",
    "stalled": "cancelled",
    "stop_string": "stop",
    "timeout": "timeout",
    "shutdown": "shutdown",
    "relay_error": "error",
}


def _plan_ids(plan: PrefillPlan | DecodePlan) -> list[str]:
    return [seq_id for seq_id, _ in plan.chunks] if isinstance(plan, PrefillPlan) else list(plan.seq_ids)


class StepBackend(Protocol):
    """What the scheduler needs of a model runner (ModelRunner, or a fake in tests)."""

    def add(
        self, seq_id: str, prompt: Sequence[int], params: SamplingParams, stop_token_ids: Iterable[int] | None
    ) -> None: ...

    def release(self, seq_id: str) -> None: ...

    def prefill(self, chunks: Sequence[PrefillChunk]) -> StepResult: ...

    def decode(self, seq_ids: Iterable[str]) -> StepResult: ...

    def split(self, seq_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Two halves of a decode batch that each need less memory than the whole."""
        ...

    def free_cached_memory(self) -> None:
        """Give cached accelerator memory back before a retry (after an out-of-memory step)."""
        ...


class StepFailure(RuntimeError):
    """A sequence the step could not serve (its logits were not finite, it did not fit in memory)."""


class StepCaller(Protocol):
    """How a step reaches the model: a worker thread in production, inline in actor tests."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


def thread_step_caller() -> StepCaller:
    """Run each step in a worker thread, one at a time, so the event loop keeps serving."""
    limiter = trio.CapacityLimiter(1)

    async def call(fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=limiter)

    return call


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    batch: BatchSettings
    max_queue: int  # waiting requests beyond the running batch; more are refused with 429
    max_context: int
    arrival_window: float = 0.0  # seconds to gather arrivals before the first prefill of an idle batch


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    running: int = 0
    waiting: int = 0
    prefilling: int = 0
    steps: int = 0
    failing_steps: int = 0  # consecutive steps that failed: the server is degraded from 3 on

    @property
    def degraded(self) -> bool:
        return self.failing_steps >= DEGRADED_AFTER_FAILED_STEPS


@dataclass(slots=True)
class _Request:
    submit: Submit
    prompt_remaining: int
    generated: int = 0
    last_token_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.submit.request_id


@dataclass(slots=True)
class _Work:
    """One trip to the worker thread: releases and joins first, then at most one step."""

    releases: list[str] = field(default_factory=list)
    joins: list[_Request] = field(default_factory=list)
    plan: StepPlan = None


class GpuScheduler:
    def __init__(
        self,
        backend: StepBackend,
        settings: SchedulerSettings,
        metrics: trio.MemorySendChannel[MetricsEvent],
        *,
        step_caller: StepCaller | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._metrics = metrics
        self._call = step_caller or thread_step_caller()
        self._clock = clock
        self._inbox_send, self._inbox = trio.open_memory_channel[SchedulerMessage](math.inf)
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._pending_releases: list[str] = []
        # Aborted running requests whose row is not freed yet: their teardown is measured at the release.
        self._aborted: dict[str, tuple[Abort, RequestFinished]] = {}
        self._consecutive_prefills = 0
        self._steps = 0
        self._drain_rate = 0.0
        self._consecutive_failures = 0
        self.stats = SchedulerStats()

    # -- the handle other tasks use ------------------------------------------------------------
    def submit(self, message: Submit) -> None:
        self._send(message)

    def abort(self, request_id: str, reason: AbortReason) -> None:
        """Synchronous and idempotent: safe in a cancelled task's ``finally``."""
        self._send(Abort(request_id, reason, self._clock(), self._steps))

    def abort_all(self, reason: AbortReason) -> None:
        self._send(AbortAll(reason, self._clock(), self._steps))

    def close(self) -> None:
        self._inbox_send.close()

    def _send(self, message: SchedulerMessage) -> None:
        try:
            self._inbox_send.send_nowait(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if isinstance(message, Submit):
                self._emit(
                    message.events,
                    Rejected(message.request_id, 503, "the server is shutting down", None, self._clock()),
                )
                message.events.close()

    # -- the actor -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[GpuScheduler] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._inbox:
            task_status.started(self)
            while True:
                if not self._has_work():
                    deadline = self._next_deadline()
                    with trio.move_on_at(deadline if deadline is not None else math.inf):
                        try:
                            self._handle(await self._inbox.receive())
                        except trio.EndOfChannel:
                            break
                    if self._waiting and not self._running and self._settings.arrival_window > 0:
                        await trio.sleep(self._settings.arrival_window)  # the others come in meanwhile
                if not self._drain_inbox():
                    break
                self._expire_deadlines()
                work = self._next_work()
                if work.releases or work.joins or work.plan is not None:
                    await self._execute(work)
                self._publish_stats()
            self._fail_everything("the scheduler stopped")

    def _has_work(self) -> bool:
        return bool(self._running or self._waiting or self._pending_releases)

    def _drain_inbox(self) -> bool:
        """Handle every waiting message; False once the inbox is closed (the server is stopping)."""
        while True:
            try:
                message = self._inbox.receive_nowait()
            except trio.WouldBlock:
                return True
            except trio.EndOfChannel:
                return False
            self._handle(message)

    def _handle(self, message: SchedulerMessage) -> None:
        match message:
            case Submit():
                self._on_submit(message)
            case Abort():
                self._on_abort(message)
            case AbortAll():
                for request in [*self._waiting, *self._running.values()]:
                    self._on_abort(Abort(request.request_id, message.reason, message.at, message.steps))

    def _on_submit(self, submit: Submit) -> None:
        now = self._clock()
        # Requests that will take a free row at the next step are not queueing (they may be held
        # back for the arrival window): the bound is on those beyond the batch.
        free_rows = max(0, self._settings.batch.max_batch_size - len(self._running))
        if len(self._waiting) >= self._settings.max_queue + free_rows:
            retry = max(1.0, self._drain_rate * (len(self._waiting) + 1))
            self._emit(submit.events, Rejected(submit.request_id, 429, "the waiting queue is full", retry, now))
            submit.events.close()
            self._metric(RequestRejected(submit.request_id, 429, "queue_full"))
            return
        request = _Request(submit, prompt_remaining=len(submit.prompt))
        self._waiting.append(request)
        self._emit(submit.events, Queued(submit.request_id, len(self._waiting), now))
        self._metric(RequestQueued(submit.request_id, len(submit.prompt)))
        log.debug("queued", request_id=submit.request_id, position=len(self._waiting))

    def _on_abort(self, abort: Abort) -> None:
        reason = ABORT_FINISH[abort.reason]
        for waiting in self._waiting:
            if waiting.request_id == abort.request_id:
                self._waiting.remove(waiting)  # it holds no row: nothing to free
                finished = self._finish(waiting, reason)
                self._metric(self._torn_down(finished, abort))
                return
        running = self._running.pop(abort.request_id, None)
        if running is not None:
            self._pending_releases.append(running.request_id)
            self._aborted[running.request_id] = (abort, self._finish(running, reason))

    def _next_deadline(self) -> float | None:
        deadlines = [r.submit.deadline for r in (*self._waiting, *self._running.values()) if r.submit.deadline]
        if not deadlines:
            return None
        # move_on_at takes trio's clock; deadlines are monotonic: convert the nearest one.
        return trio.current_time() + max(0.0, min(deadlines) - self._clock())

    def _expire_deadlines(self) -> None:
        now = self._clock()
        for request in [*self._waiting, *self._running.values()]:
            if request.submit.deadline is not None and now >= request.submit.deadline:
                self._on_abort(Abort(request.request_id, "timeout", now, self._steps))

    # -- planning and stepping -------------------------------------------------------------------
    def _next_work(self) -> _Work:
        work = _Work(releases=self._pending_releases)
        self._pending_releases = []
        now = self._clock()
        for _ in range(admit_count(len(self._waiting), len(self._running), self._settings.batch)):
            request = self._waiting.popleft()
            self._running[request.request_id] = request
            work.joins.append(request)
            self._emit(request.submit.events, Admitted(request.request_id, now))
            self._metric(RequestAdmitted(request.request_id, now - request.submit.received_at))
        views = [SequenceView(r.request_id, r.prompt_remaining) for r in self._running.values()]
        work.plan = plan_step(views, self._consecutive_prefills, self._settings.batch)
        return work

    async def _execute(self, work: _Work) -> None:
        plan = work.plan

        def in_thread() -> StepResult | None:
            for seq_id in work.releases:
                try:
                    self._backend.release(seq_id)
                except Exception:  # the other releases must still happen, or their rows leak
                    log.exception("release_failed", request_id=seq_id)
            for request in work.joins:
                s = request.submit
                self._backend.add(s.request_id, s.prompt, s.params, s.stop_token_ids)
            if plan is None:
                return None
            try:
                return self._run_plan(plan)
            except StepOutOfMemory:
                return self._retry_split(plan)

        try:
            result = await self._call(in_thread)
        except Exception as error:  # one bad step must not take the server down
            self._fail_step(work, error)
            return
        finally:
            for seq_id in work.releases:  # their rows are free now (before this trip's step counts)
                if (aborted := self._aborted.pop(seq_id, None)) is not None:
                    self._metric(self._torn_down(aborted[1], aborted[0]))
        if result is None:
            return
        self._steps += 1
        self._consecutive_failures = 0 if result.tokens or not result.failed else self._consecutive_failures + 1
        if isinstance(plan, PrefillPlan):
            self._consecutive_prefills += 1
            for seq_id, n in plan.chunks:
                request = self._running.get(seq_id)
                if request is not None and seq_id not in result.failed:
                    request.prompt_remaining -= n
        else:
            self._consecutive_prefills = 0
        self._deliver(result)

    def _run_plan(self, plan: PrefillPlan | DecodePlan) -> StepResult:
        if isinstance(plan, PrefillPlan):
            return self._backend.prefill([PrefillChunk(seq_id, n) for seq_id, n in plan.chunks])
        return self._backend.decode(plan.seq_ids)

    def _retry_split(self, plan: PrefillPlan | DecodePlan) -> StepResult:
        """Out of memory: run the step again as two halves; a half that still does not fit fails."""
        ids = _plan_ids(plan)
        kind = "prefill" if isinstance(plan, PrefillPlan) else "decode"
        log.warning("step_out_of_memory", kind=kind, sequences=len(ids))
        self._backend.free_cached_memory()
        if len(ids) < 2:
            return StepResult({}, kind, 0, 0, 0.0, dict.fromkeys(ids, "out of memory"))
        halves: list[PrefillPlan | DecodePlan]
        if isinstance(plan, PrefillPlan):
            middle = len(plan.chunks) // 2
            halves = [PrefillPlan(plan.chunks[:middle]), PrefillPlan(plan.chunks[middle:])]
        else:
            first, second = self._backend.split(plan.seq_ids)
            halves = [DecodePlan(tuple(first)), DecodePlan(tuple(second))]
        tokens: dict[str, int] = {}
        failed: dict[str, str] = {}
        seconds = 0.0
        new_tokens = 0
        for half in halves:
            if not _plan_ids(half):
                continue
            try:
                result = self._run_plan(half)
            except StepOutOfMemory:
                failed.update(dict.fromkeys(_plan_ids(half), "out of memory, also with the batch split in two"))
                continue
            tokens.update(result.tokens)
            failed.update(result.failed)
            seconds += result.seconds
            new_tokens += result.new_tokens
        return StepResult(tokens, kind, len(ids) - len(failed), new_tokens, seconds, failed)

    def _deliver(self, result: StepResult) -> None:
        now = self._clock()
        for seq_id, why in result.failed.items():
            failed = self._running.pop(seq_id, None)
            if failed is not None:
                self._pending_releases.append(seq_id)
                self._fail(failed, StepFailure(why))
        gaps: list[float] = []
        for seq_id, token in result.tokens.items():
            request = self._running.get(seq_id)
            if request is None:  # aborted while the step ran: its token is dropped
                continue
            if request.last_token_at is None:
                self._metric(FirstToken(seq_id, now - request.submit.received_at))
            else:
                gaps.append(now - request.last_token_at)
            request.last_token_at = now
            request.generated += 1
            finish, is_stop = self._finish_reason(request, token)
            self._emit(request.submit.events, TokenOut(seq_id, token, request.generated - 1, now, finish, is_stop))
            if finish is not None and self._running.pop(seq_id, None) is not None:
                self._pending_releases.append(seq_id)
                self._metric(self._finish(request, finish))
        self._metric(
            StepCompleted(result.kind, result.batch, result.new_tokens, len(result.tokens), result.seconds, tuple(gaps))
        )
        self._update_drain_rate(result)

    def _finish_reason(self, request: _Request, token: int) -> tuple[FinishReason | None, bool]:
        params = request.submit.params
        is_stop = token in request.submit.stop_token_ids and not params.ignore_eos
        if is_stop and request.generated >= params.min_tokens:
            return "stop", True
        if request.generated >= params.max_tokens:
            return "length", False
        if len(request.submit.prompt) + request.generated >= self._settings.max_context:
            return "length", False
        return None, False

    def _finish(self, request: _Request, reason: FinishReason) -> RequestFinished:
        """Send the request its terminal event; return its metrics event, which an aborted request
        sends once its row is freed (with the teardown measured) and any other sends at once."""
        now = self._clock()
        prompt_tokens = len(request.submit.prompt)
        self._emit(
            request.submit.events,
            Finished(request.request_id, reason, prompt_tokens, request.generated, now),
        )
        request.submit.events.close()  # the terminal event: the relay's loop ends after it
        finished = RequestFinished(
            request.request_id, reason, prompt_tokens, request.generated, now - request.submit.received_at
        )
        log.debug("finished", request_id=request.request_id, reason=reason, tokens=request.generated)
        return finished

    def _torn_down(self, finished: RequestFinished, abort: Abort) -> RequestFinished:
        return dataclasses.replace(
            finished,
            teardown_seconds=max(0.0, self._clock() - abort.at),
            teardown_steps=max(0, self._steps - abort.steps),
            abort_reason=abort.reason,
        )

    def _fail_step(self, work: _Work, error: Exception) -> None:
        """Fail the requests that were in the failed step; everyone else keeps going."""
        plan = work.plan
        involved = [r.request_id for r in work.joins]
        if isinstance(plan, PrefillPlan):
            involved += [seq_id for seq_id, _ in plan.chunks]
        elif isinstance(plan, DecodePlan):
            involved += list(plan.seq_ids)
        involved = list(dict.fromkeys(involved))  # a request that joined this step is also in its plan
        log.error("step_failed", error=repr(error), requests=involved)
        self._consecutive_failures += 1
        for seq_id in involved:
            request = self._running.pop(seq_id, None)
            if request is None:
                continue
            self._pending_releases.append(seq_id)
            self._fail(request, error)

    def _fail(self, request: _Request, error: BaseException) -> None:
        error_type = type(error).__name__
        self._emit(
            request.submit.events, Failed(request.request_id, str(error) or error_type, error_type, self._clock())
        )
        request.submit.events.close()
        self._metric(RequestFailed(request.request_id, error_type, str(error)))

    def _fail_everything(self, message: str) -> None:
        for request in [*self._waiting, *self._running.values()]:
            self._fail(request, RuntimeError(message))
        self._waiting.clear()
        self._running.clear()

    def _update_drain_rate(self, result: StepResult) -> None:
        # Seconds a waiting request waits per request ahead of it, smoothed: the busier the
        # batch and the longer the steps, the longer a refused client should wait to retry.
        if result.kind != "decode" or not self._running:
            return
        per_request = result.seconds * max(1, len(self._running)) / max(1, result.batch)
        self._drain_rate = per_request if self._drain_rate == 0 else 0.9 * self._drain_rate + 0.1 * per_request

    def _publish_stats(self) -> None:
        if (len(self._running), len(self._waiting)) != (self.stats.running, self.stats.waiting):
            self._metric(QueueState(len(self._running), len(self._waiting)))
        prefilling = sum(1 for r in self._running.values() if r.prompt_remaining > 0)
        self.stats = SchedulerStats(
            running=len(self._running),
            waiting=len(self._waiting),
            prefilling=prefilling,
            steps=self._steps,
            failing_steps=self._consecutive_failures,
        )

    # -- sending without ever waiting --------------------------------------------------------------
    def _emit(self, channel: trio.MemorySendChannel[SchedulerEvent], event: SchedulerEvent) -> None:
        try:
            channel.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The relay is gone: the client left. Free the request like an abort.
            if event.request_id in self._running or any(r.request_id == event.request_id for r in self._waiting):
                self._on_abort(Abort(event.request_id, "client_disconnect", self._clock(), self._steps))
        except trio.WouldBlock:
            log.error("event_channel_full", request_id=event.request_id)
            self._on_abort(Abort(event.request_id, "stalled", self._clock(), self._steps))

    def _metric(self, event: MetricsEvent) -> None:
        # Metrics must never hold up generation: a metrics actor that is gone loses the event.
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._metrics.send_nowait(event)

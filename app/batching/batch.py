"""The batch: every request the scheduler holds and its progress, and the policy that moves them.

One owner: only this object knows which requests wait and which run, how many tokens each has,
and which rows are to be freed. How far each one's row is (``num_computed``) it takes from the
runner's reports alone: what ``add`` started a row with, and each step's ``RowOutput``. The
scheduler actor calls it between steps and turns what it returns into messages; ``R`` is
whatever the actor replies on (a channel), opaque here. No trio, no torch: the actor tests run
it with a fake runner, and its own tests call it directly.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.batching.admission import DrainRate, queue_is_full
from app.batching.finish import ABORT_FINISH, AbortReason, FinishReason, finish_reason, must_continue
from app.batching.plan import SequenceView, admit_count, plan_step
from app.batching.step_pace import StepPace
from app.config import Profile
from app.contract.failures import FailureCode
from app.contract.sampling import SamplingParams
from app.contract.step import StepPlan, StepResult, TokenLogprobs

R = TypeVar("R")
DEGRADED_AFTER_FAILED_STEPS = 3


@dataclass(slots=True)
class Tracked(Generic[R]):
    """One request, from its arrival to its end."""

    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    received_at: float
    deadline: float | None
    reply: R
    # Another request of ours with the same prompt (choice 0 of a request with n > 1): this one
    # waits for that one's prefill and copies its keys instead of prefilling the prompt again. Once
    # it joins, the parent it forked from, or None if it joined with a full prefill of its own.
    fork_from: str | None = None
    num_computed: int = 0  # tokens in its row (prompt, then generated), as the runner last said
    generated: int = 0
    last_token_at: float | None = None

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not computed yet."""
        return max(0, len(self.prompt) - self.num_computed)


@dataclass(frozen=True, slots=True)
class Refused:
    retry_after: float  # seconds


@dataclass(frozen=True, slots=True)
class Teardown:
    """How long, and how many model steps, an aborted request held the batch after its abort."""

    seconds: float
    steps: int
    reason: AbortReason


@dataclass(frozen=True, slots=True)
class Ended(Generic[R]):
    """A request that left the batch without an error: its last event is due."""

    request: Tracked[R]
    reason: FinishReason
    at: float
    teardown: Teardown | None = None  # set for an aborted request, once nothing of it is left
    row_held: bool = False  # aborted while running: its teardown comes when ``freed`` frees its row


@dataclass(slots=True)
class Work(Generic[R]):
    """One trip to the worker thread: free rows first, then add the joiners, then at most one step."""

    releases: list[str] = field(default_factory=list)
    joins: list[Tracked[R]] = field(default_factory=list)
    plan: StepPlan | None = None
    must_continue: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.releases or self.joins or self.plan is not None)


@dataclass(frozen=True, slots=True)
class TokenDelivery(Generic[R]):
    request: Tracked[R]
    token: int
    index: int
    finish: FinishReason | None  # set on the request's last token
    is_stop_token: bool
    first: bool  # its first token: time to first token is now
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass(slots=True)
class StepOutcome(Generic[R]):
    deliveries: list[TokenDelivery[R]] = field(default_factory=list)
    failed: list[tuple[Tracked[R], FailureCode]] = field(default_factory=list)  # these sequences alone
    gaps: list[float] = field(default_factory=list)  # seconds since each decoded sequence's last token


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0
    failing_steps: int = 0  # consecutive steps that failed: the server is degraded from 3 on

    @property
    def degraded(self) -> bool:
        return self.failing_steps >= DEGRADED_AFTER_FAILED_STEPS


@dataclass(frozen=True, slots=True)
class _Aborted(Generic[R]):
    ended: Ended[R]
    sent_at: float  # when the abort was sent (a disconnect noticed), and the steps run by then
    steps: int
    reason: AbortReason


class Batch(Generic[R]):
    def __init__(self, profile: Profile, max_context: int) -> None:
        self.profile = profile
        self.max_context = max_context
        self.waiting: deque[Tracked[R]] = deque()
        self.running: dict[str, Tracked[R]] = {}
        self._releases: list[str] = []
        self._aborted: dict[str, _Aborted[R]] = {}  # running requests aborted, rows not freed yet
        self._consecutive_prefills = 0
        self._drain = DrainRate()
        self._pace = StepPace()  # how long decode steps and prompt tokens take here
        self.steps = 0  # steps that ran (the teardown of an abort is counted in them)
        self.failing_steps = 0

    # -- arrivals and endings --------------------------------------------------------------------
    def offer(self, request: Tracked[R]) -> int | Refused:
        """Queue a request: its place in the queue, or Refused when the queue is full."""
        if queue_is_full(len(self.waiting), len(self.running), self.profile):
            return Refused(self._drain.retry_after(len(self.waiting)))
        self.waiting.append(request)
        return len(self.waiting)

    def abort(self, request_id: str, reason: AbortReason, sent_at: float, steps: int, now: float) -> Ended[R] | None:
        """End a request (idempotent: None when it is not here any more). A queued one holds no row;
        a running one's row is freed on the next trip, and its teardown is measured then."""
        finish = ABORT_FINISH[reason]
        for waiting in self.waiting:
            if waiting.request_id == request_id:
                self.waiting.remove(waiting)
                return Ended(waiting, finish, now, Teardown(max(0.0, now - sent_at), 0, reason))
        running = self.running.pop(request_id, None)
        if running is None:
            return None
        ended = Ended(running, finish, now, row_held=True)
        self._releases.append(request_id)
        self._aborted[request_id] = _Aborted(ended, sent_at, steps, reason)
        return ended

    def abort_all(self, reason: AbortReason, sent_at: float, steps: int, now: float) -> list[Ended[R]]:
        ids = [r.request_id for r in self.all()]
        return [ended for request_id in ids if (ended := self.abort(request_id, reason, sent_at, steps, now))]

    def abort_expired(self, now: float) -> list[Ended[R]]:
        late = [r.request_id for r in self.all() if r.deadline is not None and now >= r.deadline]
        return [ended for request_id in late if (ended := self.abort(request_id, "timeout", now, self.steps, now))]

    def next_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self.all() if r.deadline is not None]
        return min(deadlines) if deadlines else None

    def all(self) -> list[Tracked[R]]:
        return [*self.waiting, *self.running.values()]

    def clear(self) -> list[Tracked[R]]:
        """Take every request out (the scheduler is stopping: each is failed)."""
        everyone = self.all()
        self.waiting.clear()
        self.running.clear()
        return everyone

    @property
    def idle(self) -> bool:
        return not (self.running or self.waiting or self._releases)

    # -- steps -----------------------------------------------------------------------------------
    def take_work(self) -> Work[R]:
        """The next trip: the rows to free, the requests that join, and the step to run."""
        work: Work[R] = Work(releases=self._releases)
        self._releases = []
        self._admit(work)
        joining = {r.request_id for r in work.joins if r.fork_from is not None}
        views = [SequenceView(r.request_id, _prompt_left(r, joining)) for r in self.running.values()]
        slowdown = self.profile.mixed_step_slowdown
        work.plan = plan_step(
            views, self._consecutive_prefills, self.profile, lambda room: self._pace.prompt_room(room, slowdown)
        )
        if work.plan is not None:
            held = [self.running[seq_id] for seq_id in work.plan.seq_ids]
            work.must_continue = frozenset(r.request_id for r in held if must_continue(r.generated, r.params))
        return work

    def _admit(self, work: Work[R]) -> None:
        """Waiting requests take the free rows in arrival order; a forked one whose parent is not
        prefilled yet keeps its place and lets those behind it go first."""
        rows = admit_count(len(self.waiting), len(self.running), self.profile)
        if not rows:
            return
        waiting_ids = {r.request_id for r in self.waiting}
        kept: deque[Tracked[R]] = deque()
        for request in self.waiting:
            if len(work.joins) >= rows or self._holds(request, waiting_ids):
                kept.append(request)
                continue
            if request.fork_from is not None:
                parent = self.running.get(request.fork_from)
                if parent is None or parent.prompt != request.prompt:
                    # The parent is gone (ended, failed, or a cache hit that never came here).
                    request.fork_from = None
            self.running[request.request_id] = request
            work.joins.append(request)
        self.waiting = kept

    def _holds(self, request: Tracked[R], waiting_ids: set[str]) -> bool:
        """A forked request waits while its parent waits or prefills."""
        if request.fork_from is None:
            return False
        parent = self.running.get(request.fork_from)
        if parent is not None:
            return parent.prompt_left > 0
        return request.fork_from in waiting_ids

    def apply_starts(self, started: dict[str, int]) -> None:
        """What the runner said each joiner starts with (prompt tokens already in its row): only the
        rest is left to prefill. Applied before the trip's step is (its plan was made before)."""
        for request_id, computed in started.items():
            if (request := self.running.get(request_id)) is not None:
                request.num_computed = computed

    def apply_freed(self, released: list[str], now: float) -> list[Ended[R]]:
        """The rows of ``released`` are free now: the aborted requests among them, each with its
        teardown (the steps counted are those that ran since the abort, before this trip's step)."""
        done = []
        for seq_id in released:
            if (aborted := self._aborted.pop(seq_id, None)) is not None:
                steps = max(0, self.steps - aborted.steps)
                teardown = Teardown(max(0.0, now - aborted.sent_at), steps, aborted.reason)
                done.append(dataclasses.replace(aborted.ended, teardown=teardown, row_held=False))
        return done

    def apply_step(self, plan: StepPlan, result: StepResult, now: float) -> StepOutcome[R]:
        """Apply a step's result: where each row is now, each new token and whether it ends its
        request (a request aborted while the step ran is gone: what the step gave it is dropped)."""
        self.steps += 1
        self.failing_steps = 0 if result.produced or not result.failed else self.failing_steps + 1
        outcome: StepOutcome[R] = StepOutcome()
        # A mixed step decodes too: the decoders are not waiting, so it counts as no prefill.
        self._consecutive_prefills = self._consecutive_prefills + 1 if plan.kind == "prefill" else 0
        for seq_id, why in result.failed.items():
            if (failed := self.running.pop(seq_id, None)) is not None:
                self._releases.append(seq_id)
                outcome.failed.append((failed, why))
        for seq_id, row in result.rows.items():
            if (request := self.running.get(seq_id)) is not None:
                request.num_computed = row.num_computed
                self._deliver(request, row.tokens, row.logprobs, now, outcome)
        if plan.decode:
            self._drain.observe_decode(result.seconds, result.batch, len(self.running))
        self._pace.observe(result.kind, result.seconds, result.prefilled)
        return outcome

    def _deliver(
        self,
        request: Tracked[R],
        tokens: tuple[int, ...],
        logprobs: tuple[TokenLogprobs, ...],
        now: float,
        outcome: StepOutcome[R],
    ) -> None:
        """A row's new tokens, in order, up to the one that ends its request."""
        for i, token in enumerate(tokens):
            first = request.last_token_at is None
            if request.last_token_at is not None:
                outcome.gaps.append(now - request.last_token_at)
            request.last_token_at = now
            request.generated += 1
            finish, is_stop = finish_reason(
                token,
                request.generated,
                request.params,
                request.stop_token_ids,
                len(request.prompt) + request.generated,
                self.max_context,
            )
            chosen = logprobs[i] if i < len(logprobs) else None
            delivery = TokenDelivery(request, token, request.generated - 1, finish, is_stop, first, chosen)
            outcome.deliveries.append(delivery)
            if finish is not None:
                del self.running[request.request_id]
                self._releases.append(request.request_id)
                return

    def fail_step(self, work: Work[R]) -> list[Tracked[R]]:
        """The step raised: its requests (those that joined in it too) leave, the others go on."""
        self.failing_steps += 1
        involved = [r.request_id for r in work.joins] + list(work.plan.seq_ids if work.plan else ())
        failed = []
        for seq_id in dict.fromkeys(involved):
            if (request := self.running.pop(seq_id, None)) is not None:
                self._releases.append(seq_id)
                failed.append(request)
        return failed

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.steps, self.failing_steps)


def _prompt_left(request: Tracked[R], joining_forks: set[str]) -> int:
    """What the plan may give a sequence: the prompt tokens the runner has not computed yet. A
    fork that joins in this trip is not added yet; the runner starts it with its parent's keys for
    all but the last prompt token (StepBackend.add), so that one is its prefill, with its own
    logits and generator."""
    if request.request_id in joining_forks:
        return 1
    return request.prompt_left

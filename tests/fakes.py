"""Test doubles: a model backend with predictable tokens, and an inline step caller."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from actors.step_thread import StepCaller
from app.contract.sampling import SamplingParams
from app.contract.step import PrefixCacheStats, RowOutput, StepPlan, StepResult, TokenLogprobs

T = TypeVar("T")


@dataclass
class FakeSequence:
    prompt: list[int]
    num_computed: int  # tokens "in its row", as a real runner counts them
    generated: int = 0

    @property
    def prompt_left(self) -> int:
        return max(0, len(self.prompt) - self.num_computed)


@dataclass
class FakeBackend:
    """Token i of a sequence is ``(prompt[0] + i) % 1000``; ``stop_after`` ends sequences with a stop token.

    ``fail`` decides, for each step, whether it raises (to test fault handling); it is given the
    step's kind and sequences, as ``log`` records them. It does not mask stop tokens for
    ``must_continue`` (a real runner does): the scheduler's own rule is what the actor tests see.
    """

    stop_token: int = 999_999
    stop_after: int | None = None
    fail: Callable[[str, list[str]], Exception | None] = lambda kind, ids: None
    seqs: dict[str, FakeSequence] = field(default_factory=dict)
    log: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    forks: list[tuple[str, str]] = field(default_factory=list)  # (child, parent), as added
    # Prompt tokens a new sequence finds in a prefix cache (a real runner's lookup), by prompt.
    cached_prefix: Callable[[Sequence[int]], int] = lambda prompt: 0

    def add(
        self,
        seq_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Iterable[int] | None = None,
        fork_from: str | None = None,
    ) -> int:
        assert seq_id not in self.seqs, f"{seq_id} added twice"
        start = min(self.cached_prefix(prompt), len(prompt) - 1)
        if fork_from is not None:  # a real runner copies the parent's keys: only the last token is left
            parent = self.seqs[fork_from]
            assert parent.prompt == list(prompt) and parent.prompt_left == 0, "forked from a parent not prefilled"
            self.forks.append((seq_id, fork_from))
            start = len(prompt) - 1
        self.seqs[seq_id] = FakeSequence(list(prompt), start)
        return start

    def release(self, seq_id: str) -> None:
        if self.seqs.pop(seq_id, None) is not None:
            self.released.append(seq_id)

    def _next(self, seq_id: str) -> int:
        seq = self.seqs[seq_id]
        seq.generated += 1
        if self.stop_after is not None and seq.generated > self.stop_after:
            return self.stop_token
        return (seq.prompt[0] + seq.generated - 1) % 1000

    def step(self, plan: StepPlan, must_continue: Collection[str] = ()) -> StepResult:
        ids = list(plan.seq_ids)
        self.log.append((plan.kind, tuple(ids)))
        if (error := self.fail(plan.kind, ids)) is not None:
            raise error
        rows = {}
        for seq_id in plan.decode:
            seq = self.seqs[seq_id]
            assert seq.prompt_left == 0, "decode before prefill finished"
            seq.num_computed += 1
            rows[seq_id] = RowOutput(seq.num_computed, (self._next(seq_id),))
        prompt = 0
        for chunk in plan.chunks:
            seq = self.seqs[chunk.seq_id]
            assert seq.prompt_left > 0, "prefill of a sequence whose prompt is in"
            take = min(chunk.tokens, seq.prompt_left)  # a real runner takes what is left too
            seq.num_computed += take
            prompt += take
            tokens = () if seq.prompt_left else (self._next(chunk.seq_id),)
            rows[chunk.seq_id] = RowOutput(seq.num_computed, tokens)
        return StepResult(rows, plan.kind, len(ids), len(plan.decode) + prompt, 0.001, prompt_tokens=prompt)

    def split(self, seq_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        middle = len(seq_ids) // 2
        return list(seq_ids[:middle]), list(seq_ids[middle:])

    def free_cached_memory(self) -> None:
        self.log.append(("free_cached_memory", ()))

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return None


def chosen(result: StepResult) -> dict[str, int]:
    """The token each row got from a step that gives one at most (rows that got none left out)."""
    assert all(len(row.tokens) <= 1 for row in result.rows.values()), "a step gave a row several tokens"
    return {seq_id: row.tokens[0] for seq_id, row in result.rows.items() if row.tokens}


def chosen_logprobs(result: StepResult) -> dict[str, TokenLogprobs]:
    """The logprobs of each row's one new token (rows that asked for none left out)."""
    return {seq_id: row.logprobs[0] for seq_id, row in result.rows.items() if row.logprobs}


def inline_steps(seconds: float = 0.01) -> StepCaller:
    """Run steps in the event loop, each taking ``seconds`` of (virtual) time."""

    async def call(fn: Callable[[], T]) -> T:
        await trio.sleep(seconds)
        return fn()

    return call


def slow_steps(seconds: float) -> StepCaller:
    """Real steps in a worker thread, each after ``seconds`` of waiting: a model whose steps are
    slow, so that what happens within one step is not a matter of scheduling luck."""

    async def call(fn: Callable[[], T]) -> T:
        await trio.sleep(seconds)
        return await trio.to_thread.run_sync(fn)

    return call


class FaultInjectingRunner:
    """Wraps a real runner; a step that involves a sequence whose prompt contains ``marker`` raises
    ``error`` (e.g. a RuntimeError standing for a CUDA fault) instead of running, or, with
    ``hang_seconds``, hangs that long (a stuck kernel) and then runs."""

    def __init__(
        self, runner: Any, marker: Sequence[int], error: Callable[[], Exception], hang_seconds: float = 0.0
    ) -> None:
        self._runner = runner
        self._marker = list(marker)
        self._error = error
        self._hang = hang_seconds
        self._faulty: set[str] = set()
        self.faults = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def add(
        self,
        seq_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Iterable[int] | None = None,
        fork_from: str | None = None,
    ) -> int:
        tokens, m = list(prompt), self._marker
        if any(tokens[i : i + len(m)] == m for i in range(len(tokens) - len(m) + 1)):
            self._faulty.add(seq_id)
        return int(self._runner.add(seq_id, prompt, params, stop_token_ids, fork_from))

    def release(self, seq_id: str) -> None:
        self._faulty.discard(seq_id)
        self._runner.release(seq_id)

    def _check(self, seq_ids: Iterable[str]) -> None:
        marked = self._faulty.intersection(seq_ids)
        if not marked:
            return
        self.faults += 1
        if not self._hang:
            raise self._error()
        self._faulty -= marked  # each marked sequence hangs its first step only
        time.sleep(self._hang)

    def step(self, plan: StepPlan, must_continue: Collection[str] = ()) -> StepResult:
        self._check(plan.seq_ids)
        return self._runner.step(plan, must_continue)


def with_faults(
    marker: Sequence[int], error: Callable[[], Exception] = RuntimeError, hang_seconds: float = 0.0
) -> Callable[[Any], Any]:
    """A ``runner_hook`` for tests.conftest.running_server that injects step faults (or hangs)."""
    import dataclasses

    def hook(loaded: Any) -> Any:
        return dataclasses.replace(loaded, runner=FaultInjectingRunner(loaded.runner, marker, error, hang_seconds))

    return hook

"""The run's record: phases run one by one under time limits, each one's outcome kept.

A phase that fails or runs out of budget is recorded and the run goes on, so one run always yields
a table. ``checkpoint`` is called as each phase begins and ends (the CLI writes the JSON there):
a run that hangs, or is killed, still leaves what was done and which phase it was in.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tools.gpu_check.plan import Plan


@dataclass
class Report:
    plan: Plan
    checkpoint: Callable[[Report], None] = lambda report: None
    started: float = field(default_factory=time.monotonic)
    info: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, float | None] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished: bool = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.plan.budget - self.elapsed()

    def limit(self, phase: str) -> float:
        return max(0.0, min(self.plan.limits.get(phase, 60.0), self.left()))

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def finish(self) -> None:
        self.finished = True
        self.checkpoint(self)

    def _begin(self, name: str) -> dict[str, Any] | None:
        record: dict[str, Any] = {"status": "running"}
        self.phases[name] = record
        if self.left() <= 0:
            record["status"] = "skipped: the run's budget is spent"
            self.say(f"{name}: skipped, the run's budget is spent")
            self.checkpoint(self)
            return None
        self.say(f"{name} ...")
        self.checkpoint(self)
        return record

    def _end(self, name: str, record: dict[str, Any], began: float, error: Exception | None) -> None:
        record["seconds"] = round(time.monotonic() - began, 2)
        if error is None:
            record["status"] = "ok"
            self.say(f"{name}: done in {record['seconds']} s")
        else:
            record["status"] = "failed"
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback"] = "".join(traceback.format_exception(error))
            self.say(f"{name}: FAILED {record['error']}")
        self.checkpoint(self)

    def run(self, name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one phase; its failure is recorded, not raised. None when it failed or was skipped."""
        record = self._begin(name)
        if record is None:
            return None
        began = time.monotonic()
        try:
            record.update(measure())
        except Exception as error:
            self._end(name, record, began, error)
            return None
        self._end(name, record, began, None)
        return record

    async def arun(self, name: str, measure: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any] | None:
        record = self._begin(name)
        if record is None:
            return None
        began = time.monotonic()
        try:
            record.update(await measure())
        except Exception as error:
            self._end(name, record, began, error)
            return None
        self._end(name, record, began, None)
        return record

"""Run the P0 checks against a server and write the record."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tools.p0.checks import CHECKS
from tools.p0.results import CheckResult, markdown_record, write_record
from tools.p0.settings import PlanSettings


@dataclass(frozen=True, slots=True)
class PlanRun:
    results: list[CheckResult]
    health: dict[str, Any]
    record: str

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


async def run_plan(
    url: str,
    only: Sequence[str] = (),
    plan: PlanSettings | None = None,
    record_path: Path | None = None,
    notes: Sequence[str] = (),
) -> PlanRun:
    plan = plan or PlanSettings()
    chosen = [check_id for check_id in CHECKS if not only or check_id in only]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown test ids {', '.join(unknown)}: use {', '.join(CHECKS)}")
    limits = httpx.Limits(max_connections=max(plan.perf.concurrency, plan.load.concurrency) + 8)
    results: list[CheckResult] = []
    async with httpx.AsyncClient(base_url=url, timeout=plan.perf.request_timeout, limits=limits) as client:
        try:
            health = (await client.get("/health")).json()
        except (httpx.HTTPError, ValueError) as error:
            health = {"error": f"{type(error).__name__}: {error}"}
        for check_id in chosen:
            check = CHECKS[check_id]
            try:
                results.append(await check(client, plan))
            except (httpx.HTTPError, KeyError, ValueError) as error:
                # A server that answers wrongly (or not at all) fails the check: it does not stop the plan.
                name = check.__name__.replace("_", " ").capitalize()
                results.append(CheckResult(check_id, name, False, f"{type(error).__name__}: {error}"))
    record = markdown_record(results, url, health, list(notes), dt.datetime.now(dt.UTC))
    if record_path is not None:
        write_record(record_path, record)
    return PlanRun(results, health, record)

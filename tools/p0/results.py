"""What a check found, and the record of a run."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class CheckResult:
    check_id: str
    name: str
    passed: bool
    message: str  # one line: the figures that decided it
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"


def table(results: list[CheckResult]) -> str:
    width = max((len(r.name) for r in results), default=4)
    lines = [f"{'id':<10} {'test':<{width}} {'result':<6} message"]
    lines += [f"{r.check_id:<10} {r.name:<{width}} {r.verdict:<6} {r.message}" for r in results]
    return "\n".join(lines)


def markdown_record(
    results: list[CheckResult], url: str, health: dict[str, Any], notes: list[str], when: dt.datetime
) -> str:
    runtime = health.get("runtime") or {}
    rows = "\n".join(f"| {r.check_id} | {r.name} | {r.verdict} | {r.message.replace('|', '/')} |" for r in results)
    passed = sum(r.passed for r in results)
    note_lines = "\n".join(f"- {note}" for note in notes) or "- none"
    h = {key: health.get(key, "?") for key in ("version", "profile", "model_id", "model_size", "dtype", "device")}
    v = {key: runtime.get(key, "?") for key in ("torch", "numpy", "transformers", "python")}
    return f"""# P0 test record

- Date and time: {when.isoformat(timespec="seconds")}
- Server: {url}, version {h["version"]}, profile {h["profile"]}
- Model: {h["model_id"]} ({h["model_size"]}, {h["dtype"]}, {h["device"]})
- GPU: {runtime.get("gpu") or "none"}; CUDA: {runtime.get("cuda") or "none"}
- PyTorch {v["torch"]}, NumPy {v["numpy"]}, transformers {v["transformers"]}, Python {v["python"]}
- Result: {passed} of {len(results)} passed

| id | test | result | message |
|---|---|---|---|
{rows}

## Notes

{note_lines}
"""


def write_record(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path

"""Per-model request outcomes and latency percentiles from the server's JSON log.

    python -m tools.logstats server.log            # a table
    python -m tools.logstats server.log --json     # the same figures as JSON
    python -m app ... 2> server.log                # the log it reads: JSON lines (the default format)

Outcomes come from the lifecycle lines (finished, cancelled, failed, rejected; cache-served
requests are counted as ``cached`` too); TTFT from ``first_token`` lines and cache-served
``finished`` lines, E2E from ``finished`` lines. Lines that are not JSON, or not a request's
lifecycle, are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.metrics import percentile

OUTCOMES = ("finished", "cancelled", "failed", "rejected")


@dataclass
class ModelFigures:
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys((*OUTCOMES, "cached"), 0))
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": dict(self.outcomes),
            "ttft_ms": {"p50": percentile(self.ttft_ms, 50), "p95": percentile(self.ttft_ms, 95)},
            "e2e_ms": {"p50": percentile(self.e2e_ms, 50), "p95": percentile(self.e2e_ms, 95)},
        }


def read_lines(lines: Iterable[str]) -> dict[str, ModelFigures]:
    figures: dict[str, ModelFigures] = defaultdict(ModelFigures)
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        event, model = record.get("event"), record.get("model")
        if not isinstance(model, str) or not isinstance(event, str):
            continue
        book = figures[model]
        if event in OUTCOMES:
            book.outcomes[event] += 1
            if record.get("cached"):
                book.outcomes["cached"] += 1
        has_ttft = event == "first_token" or (event == "finished" and record.get("cached"))
        if has_ttft and isinstance(record.get("ttft_ms"), int | float):
            book.ttft_ms.append(float(record["ttft_ms"]))
        if event == "finished" and isinstance(record.get("e2e_ms"), int | float):
            book.e2e_ms.append(float(record["e2e_ms"]))
    return dict(figures)


def format_table(figures: dict[str, ModelFigures]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    header = f"{'model':<40} {'ok':>6} {'cached':>6} {'cancel':>6} {'failed':>6} {'reject':>6} "
    header += f"{'TTFT p50':>9} {'TTFT p95':>9} {'E2E p50':>9} {'E2E p95':>9}"
    rows = [header]
    for model, book in sorted(figures.items()):
        s = book.summary()
        o = s["requests"]
        rows.append(
            f"{model:<40} {o['finished']:>6} {o['cached']:>6} {o['cancelled']:>6} {o['failed']:>6} {o['rejected']:>6} "
            f"{ms(s['ttft_ms']['p50']):>9} {ms(s['ttft_ms']['p95']):>9} "
            f"{ms(s['e2e_ms']['p50']):>9} {ms(s['e2e_ms']['p95']):>9}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logfile", type=Path, help="the server's JSON log ('-' for standard input)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if str(args.logfile) == "-":
        figures = read_lines(sys.stdin)
    else:
        if not args.logfile.is_file():
            print(f"error: {args.logfile} is not a file", file=sys.stderr)
            return 2
        with args.logfile.open(encoding="utf-8", errors="replace") as handle:
            figures = read_lines(handle)
    if args.json:
        print(json.dumps({model: book.summary() for model, book in figures.items()}, indent=2))
    elif figures:
        print(format_table(figures))
    else:
        print("no request lifecycle lines found (is it the JSON log of python -m app?)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

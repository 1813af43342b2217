"""python -m tools.p0: the P0 test plan against a running server.

Prints PASS or FAIL with a one-line reason per test, writes the results record as Markdown, and
exits 1 when any test fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
from pathlib import Path

import trio

from tools.p0.checks import CHECKS
from tools.p0.load import LoadSettings
from tools.p0.results import table
from tools.p0.runner import run_plan
from tools.p0.settings import PlanSettings


def build_parser() -> argparse.ArgumentParser:
    defaults = PlanSettings()
    parser = argparse.ArgumentParser(
        prog="python -m tools.p0", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server under test")
    parser.add_argument("--only", nargs="+", metavar="ID", choices=list(CHECKS), help="run only these tests")
    parser.add_argument(
        "--record", type=Path, help="where to write the Markdown record (default: results/p0-<time>.md)"
    )
    parser.add_argument("--note", action="append", default=[], help="a note for the record (repeatable)")
    perf = parser.add_argument_group("performance test (PR-PERF01)")
    perf.add_argument("--concurrency", type=int, default=defaults.perf.concurrency)
    perf.add_argument("--requests", type=int, default=defaults.perf.requests)
    perf.add_argument("--prompt-words", type=int, default=defaults.perf.prompt_words)
    perf.add_argument("--output-tokens", type=int, default=defaults.perf.max_tokens)
    perf.add_argument("--ttft-p95", type=float, default=defaults.ttft_p95_max_s, help="bound, seconds")
    perf.add_argument("--e2e-p95", type=float, default=defaults.e2e_p95_max_s, help="bound, seconds")
    perf.add_argument("--max-error-rate", type=float, default=defaults.error_rate_max)
    perf.add_argument("--profile", default=defaults.perf_profile, help="the profile the server must run")
    load = parser.add_argument_group("load and memory test (PR-LOAD01)")
    load.add_argument("--load-requests", type=int, default=defaults.load.requests)
    load.add_argument("--load-concurrency", type=int, default=defaults.load.concurrency)
    load.add_argument("--load-output-tokens", type=int, default=defaults.load.max_tokens)
    load.add_argument("--disconnect-share", type=float, default=defaults.load.disconnect_share)
    load.add_argument(
        "--max-growth", type=float, default=defaults.growth_max_mib_per_100, help="MiB of RSS per 100 requests"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def plan_from_args(args: argparse.Namespace) -> PlanSettings:
    defaults = PlanSettings()
    perf = LoadSettings(
        concurrency=args.concurrency,
        requests=args.requests,
        prompt_words=args.prompt_words,
        max_tokens=args.output_tokens,
    )
    load = dataclasses.replace(
        defaults.load,
        requests=args.load_requests,
        concurrency=args.load_concurrency,
        max_tokens=args.load_output_tokens,
        disconnect_share=args.disconnect_share,
    )
    return dataclasses.replace(
        defaults,
        perf=perf,
        perf_profile=args.profile,
        ttft_p95_max_s=args.ttft_p95,
        e2e_p95_max_s=args.e2e_p95,
        error_rate_max=args.max_error_rate,
        load=load,
        growth_max_mib_per_100=args.max_growth,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    record = args.record or Path("results") / f"p0-{stamp}.md"
    run = trio.run(run_plan, args.url, args.only or (), plan_from_args(args), record, args.note)
    print(table(run.results))
    print(f"\nrecord: {record}")
    return 0 if run.passed else 1


if __name__ == "__main__":
    sys.exit(main())

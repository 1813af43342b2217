"""python -m tools.gpu_check: the run's order of phases, and the command line.

    python -m tools.gpu_check                    # one H100/H200: under 8 minutes, start-up included
    python -m tools.gpu_check --cpu-smoke        # the same code end to end on the CPU, tiny model, seconds

Exits 1 with one ``FAIL:`` line per reason (see verdicts.py), 0 when every check and target holds.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import trio

from tools.gpu_check.baseline import generate_decode_rate
from tools.gpu_check.build import (
    build_model,
    environment,
    implementations,
    load_tokenizer,
    preflight,
    release_memory,
    served_weights,
)
from tools.gpu_check.capture import CaptureFactory, capture_factory
from tools.gpu_check.graphs import graphs_vs_eager
from tools.gpu_check.output import preflight_line, render, write_json
from tools.gpu_check.plan import Plan, gpu_plan, smoke_plan
from tools.gpu_check.report import Report
from tools.gpu_check.server import server_phases
from tools.gpu_check.verdicts import failures


async def run_check(report: Report, new_capture: CaptureFactory) -> None:
    plan = report.plan
    report.info.update(environment(plan))
    report.info["preflight"] = preflight(plan)
    print(preflight_line(report.info["preflight"]), flush=True)
    report.checkpoint(report)
    built: list[Any] = []

    def build() -> dict[str, Any]:
        model = build_model(plan)
        weights = served_weights(plan, model, load_tokenizer(int(model.config.vocab_size)))
        built.append(weights)
        return {
            "parameters": weights.parameters,
            **implementations(model),
            "dtype": str(plan.dtype).removeprefix("torch."),
        }

    model_info = report.run("build", build)
    if model_info is None:
        return
    report.info["model"] = dict(model_info)
    weights = built[0]
    single = report.run(
        "generate_1",
        lambda: generate_decode_rate(plan, weights.model, 1, plan.generate_tokens, report.limit("generate_1")),
    )
    report.figures["generate_decode_1"] = single["tok_s"] if single else None
    batch = plan.generate_batch
    many = report.run(
        "generate_batch",
        lambda: generate_decode_rate(
            plan, weights.model, batch, plan.generate_batch_tokens, report.limit("generate_batch")
        ),
    )
    report.figures[f"generate_aggregate_{batch}"] = many["tok_s"] if many else None
    release_memory(plan)
    if plan.cuda_graphs:
        report.run("graphs_vs_eager", lambda: graphs_vs_eager(plan, weights.model, new_capture()))
        release_memory(plan)
    await server_phases(plan, weights, report, new_capture())
    if plan.device.startswith("cuda"):
        report.info["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def check(plan: Plan, out: Path, new_capture: CaptureFactory | None = None) -> int:
    """One run of ``plan``: the table on stdout, the JSON at ``out`` (rewritten after every phase).

    ``new_capture``: what captures the static path's decode steps, a fresh one per runner (default:
    CUDA graphs on a GPU, the frozen stand-in in the CPU smoke run).
    """
    from app.logging_setup import configure_logging

    configure_logging("warning", "console")
    report = Report(plan, checkpoint=lambda report: write_json(report, out))
    try:
        trio.run(run_check, report, new_capture or capture_factory(plan))
    except Exception as error:  # outside any phase (the server's shutdown, say): still a table and a JSON
        report.phases["run"] = {
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "traceback": "".join(traceback.format_exception(error)),
        }
    report.finish()
    print(render(report), flush=True)
    print(f"figures written to {out}")
    return 1 if failures(report) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, tiny counts: the code path")
    parser.add_argument("--out", default="results/gpu_check.json", help="where the figures go (JSON)")
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="serve on the dynamic path instead (for comparison)"
    )
    parser.add_argument("--profile", default=None, help="scheduler profile for the server (default throughput_first)")
    parser.add_argument("--budget", type=float, default=None, help="seconds the whole run may take (default 450)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device here; use --cpu-smoke to run the code path on the CPU", file=sys.stderr)
        return 2
    changes: dict[str, Any] = {"cuda_graphs": not args.no_cuda_graphs}
    if args.profile:
        changes["profile"] = args.profile
    if args.budget:
        changes["budget"] = args.budget
    return check(smoke_plan(**changes) if args.cpu_smoke else gpu_plan(**changes), Path(args.out))


if __name__ == "__main__":
    sys.exit(main())

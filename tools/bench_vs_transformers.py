"""This server side by side with ``transformers serve --continuous-batching``, under the same load.

    pip install -e '.[bench]'                 # transformers[serving] and matplotlib
    python -m tools.bench_vs_transformers     # smollm2-135m, float32, CPU, concurrency 1 and 8
    python -m tools.bench_vs_transformers --concurrency 1,4,8 --tokens 128 --requests 16

Starts one server, measures it, stops it, then the other (never both at once): both load the same
local model folder (resolved by this project, so ``smollm2-135m`` is its safetensors build) in the
same dtype on the same device, offline. Each gets one warm-up request, then for every concurrency
level a closed-loop streaming chat load through its OpenAI-compatible endpoint (tools/chat_load.py):
the same prompts, greedy, exactly --tokens tokens per request.

Prints p50 / p95 TTFT, p50 / p95 E2E and aggregate tokens/s of both, and the ratio ours / theirs of
each (below 1 is better for the latencies, above 1 for tokens/s); saves a PNG of the latency
distributions (--plot) and every figure as JSON (--json). Exits 1 when, at --bar-concurrency, this
server does not give more tokens/s and a lower p95 TTFT than transformers serve (issue 5's bar).
--ours-url / --theirs-url measure servers that are already running instead of starting them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from tools.bench_comparison import compare, plot, render_table, to_json, token_notes, verdict
from tools.chat_load import THIS_SERVER, TRANSFORMERS_SERVE, Dialect, Phase, phase_figures, run_phase
from tools.levels import parse_levels
from tools.server_process import app_server, command_server, free_port

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...]
    requests: dict[int, int]  # per concurrency level
    tokens: int
    warmup: int


def requests_for(concurrency: int, requests: int | None) -> int:
    """Eight rounds of every client: at concurrency 8, the nearest-rank p95 is then the 61st of 64
    TTFTs rather than the 2nd slowest of 32, which moved by several percent from run to run."""
    return requests if requests is not None else 8 * concurrency


def model_folder(spec: str) -> str:
    """What both servers load: a model this project builds locally (built now if need be), a
    folder, or a hub id from the local cache."""
    from app.models.registry import resolve

    source = resolve(spec)
    return str(source.build()) if source.build is not None else source.location


def transformers_serve_command(folder: str, port: int, dtype: str, device: str, extra: Sequence[str]) -> list[str]:
    # The model as the positional argument is preloaded at start-up and pinned: requests may leave
    # `model` out. --continuous-batching is off by default (then requests run one at a time).
    return [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        folder,
        "--continuous-batching",
        "--dtype",
        dtype,
        "--device",
        device,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


@contextlib.contextmanager
def started(side: str, args: argparse.Namespace, folder: str) -> Iterator[str]:
    """The URL of the side's server: the running one given, or one started here (stopped after)."""
    given = args.ours_url if side == "ours" else args.theirs_url
    if given:
        yield given.rstrip("/")
        return
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.log_dir / f"{side}.log"
    print(f"starting {'this server' if side == 'ours' else 'transformers serve'} (log: {log_path})", flush=True)
    if side == "ours":
        ours = ["--model", folder, "--dtype", args.dtype, "--device", args.device, *shlex.split(args.ours_args)]
        with app_server(*ours, log_path=log_path, env=OFFLINE) as url:
            yield url
    else:
        port = free_port()
        command = transformers_serve_command(folder, port, args.dtype, args.device, shlex.split(args.theirs_args))
        with command_server(command, port, log_path=log_path, env=OFFLINE) as url:
            yield url


async def measure(url: str, dialect: Dialect, plan: Plan) -> list[Phase]:
    if plan.warmup:
        warm = await run_phase(url, dialect, concurrency=1, requests=plan.warmup, max_tokens=plan.tokens)
        failed = [r.error for r in warm.results if not r.ok]
        if failed:
            raise RuntimeError(f"the warm-up request failed: {failed[0]}")
    phases = []
    for concurrency in plan.concurrency:
        requests = plan.requests[concurrency]
        print(f"  {dialect.name}: concurrency {concurrency}, {requests} requests ...", end=" ", flush=True)
        phase = await run_phase(url, dialect, concurrency=concurrency, requests=requests, max_tokens=plan.tokens)
        figures = phase_figures(phase)
        print(f"{phase.wall:.1f} s, {figures.tokens_per_s:.1f} tok/s, {figures.failed} failed", flush=True)
        phases.append(phase)
    return phases


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="an alias this project knows, or a model folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for both servers")
    parser.add_argument("--concurrency", type=parse_levels, default=(1, 8), help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default: 8 x level)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up requests per server, not measured")
    parser.add_argument("--bar-concurrency", type=int, default=8, help="the level issue 5's bar is checked at")
    parser.add_argument("--ours-url", help="measure this running server instead of starting one")
    parser.add_argument("--theirs-url", help="measure this running transformers serve instead of starting one")
    parser.add_argument(
        "--ours-args",
        default="",
        help="more arguments for python -m app, as one string: --ours-args='--profile throughput_first'",
    )
    parser.add_argument(
        "--theirs-args",
        default="",
        help="more arguments for transformers serve, as one string: --theirs-args='--cb-num-blocks 256'",
    )
    parser.add_argument("--plot", type=Path, default=Path("results/bench_vs_transformers.png"))
    parser.add_argument("--json", type=Path, default=Path("results/bench_vs_transformers.json"))
    parser.add_argument("--log-dir", type=Path, default=Path("results/bench_logs"), help="the servers' logs")
    return parser


def missing_extras(start_theirs: bool) -> list[str]:
    missing = [] if importlib.util.find_spec("matplotlib") else ["matplotlib"]
    if start_theirs:
        from transformers.utils.import_utils import is_serve_available

        if not is_serve_available():
            missing.append("transformers[serving]")
    return missing


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_extras(start_theirs=not args.theirs_url)
    if missing:
        print(f"error: {' and '.join(missing)} not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    plan = Plan(
        concurrency=args.concurrency,
        requests={level: requests_for(level, args.requests) for level in args.concurrency},
        tokens=args.tokens,
        warmup=args.warmup,
    )
    folder = model_folder(args.model) if not (args.ours_url and args.theirs_url) else args.model
    phases: list[Phase] = []
    began = time.perf_counter()
    for side, dialect in (("ours", THIS_SERVER), ("theirs", TRANSFORMERS_SERVE)):
        load = os.getloadavg()[0]
        try:
            with started(side, args, folder) as url:
                print(f"{dialect.name} at {url} (1-minute load average before it started: {load:.2f})", flush=True)
                phases += trio.run(measure, url, dialect, plan)
        except (RuntimeError, TimeoutError) as error:
            given = args.ours_url if side == "ours" else args.theirs_url
            where = "" if given else f" (its log: {args.log_dir / f'{side}.log'})"
            print(f"error: {dialect.name}: {error}{where}", file=sys.stderr)
            return 2
    ours = [p for p in phases if p.server == THIS_SERVER.name]
    theirs = [p for p in phases if p.server == TRANSFORMERS_SERVE.name]
    comparisons = compare(ours, theirs)
    outcome = verdict(comparisons, args.bar_concurrency)

    settings = {
        "model": args.model,
        "folder": folder,
        "dtype": args.dtype,
        "device": args.device,
        "tokens_per_request": plan.tokens,
        "requests": plan.requests,
        "warmup": plan.warmup,
        "total_s": round(time.perf_counter() - began, 1),
    }
    title = f"{args.model} ({args.dtype}, {args.device}), {plan.tokens} tokens per request, greedy"
    print()
    print(title)
    print(render_table(comparisons))
    for note in token_notes(comparisons):
        print(f"  {note}")
    print(outcome.message)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(to_json(settings, phases, comparisons, outcome), indent=2))
    plot(phases, args.plot, title)
    print(f"figures: {args.json}; plot: {args.plot}")
    return 1 if outcome.passed is False else 0


if __name__ == "__main__":
    sys.exit(main())

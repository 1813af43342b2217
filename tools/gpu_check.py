"""GPU check: a gpt-oss-20b-shaped model with random weights, plain generate() and this server, side by side.

    python -m tools.gpu_check                    # one H100: under 8 minutes, start-up included
    python -m tools.gpu_check --cpu-smoke        # the same code end to end on the CPU, tiny model, seconds

It builds the model on the device directly (bf16, the real 20b architecture: 24 layers, 32 experts
of which 4 per token, 64 query and 8 key-value heads, sliding window 128, the o200k_harmony
vocabulary; speed does not depend on the weights' values), measures plain ``generate()``, then
serves the same weights in this process (the real app on Hypercorn, port 0, over HTTP) and
measures it. One table goes to stdout and the figures to JSON (``--out``).

Every phase has a time limit and the whole run a budget; a phase that fails or runs out of time
is reported as such and the run goes on, so one run always yields a table and a JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
import trio

from actors.metrics import percentile
from tools.stream_client import StreamTally, generate_body, stream_generate

GPT_OSS_20B: dict[str, Any] = {
    "num_hidden_layers": 24,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "sliding_window": 128,
    "vocab_size": 201088,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "eos_token_id": 200002,
    "pad_token_id": 199999,
}
STOP_TOKENS = frozenset({200002, 200012, 199999})  # <|return|>, <|call|>, <|endoftext|>
TARGETS = {"decode_1": 100.0, "aggregate_64": 2000.0, "ttft_p95": 1.0}


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how long each part may take (seconds)."""

    mode: str
    device: str
    dtype: torch.dtype
    generate_tokens: int = 64  # plain generate(), batch 1
    generate_batch: int = 64
    generate_batch_tokens: int = 32
    stream_tokens: int = 128  # per stream, server phases
    stream_counts: tuple[int, ...] = (8, 32, 64)
    max_batch: int = 64
    ttft_streams: int = 16
    ttft_prompt_tokens: int = 1024
    ttft_max_tokens: int = 16
    check_tokens: int = 32  # graphs vs eager greedy comparison
    max_seq_len: int = 2048
    profile: str = "throughput_first"
    cuda_graphs: bool = True
    budget: float = 450.0  # the whole run, start-up (imports) excluded
    limits: dict[str, float] = field(
        default_factory=lambda: {
            "build": 150.0,
            "generate_1": 45.0,
            "generate_batch": 60.0,
            "graphs_vs_eager": 45.0,
            "server_start": 120.0,
            "stream_phase": 45.0,
            "ttft": 60.0,
        }
    )


def gpu_plan(**changes: Any) -> Plan:
    return dataclasses.replace(Plan("gpu", "cuda", torch.bfloat16), **changes)


def smoke_plan(**changes: Any) -> Plan:
    small = Plan(
        "cpu-smoke",
        "cpu",
        torch.float32,
        generate_tokens=6,
        generate_batch=4,
        generate_batch_tokens=4,
        stream_tokens=8,
        stream_counts=(2, 3, 4),
        max_batch=4,
        ttft_streams=4,
        ttft_prompt_tokens=64,
        ttft_max_tokens=2,
        check_tokens=6,
        max_seq_len=256,
        budget=120.0,
    )
    return dataclasses.replace(small, **changes)


# -- the report --------------------------------------------------------------------------------
@dataclass
class Report:
    plan: Plan
    started: float = field(default_factory=time.monotonic)
    info: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, float | None] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.plan.budget - self.elapsed()

    def limit(self, phase: str) -> float:
        return max(0.0, min(self.plan.limits.get(phase, 60.0), self.left()))

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def _begin(self, name: str) -> dict[str, Any] | None:
        record: dict[str, Any] = {"status": "ok"}
        self.phases[name] = record
        if self.left() <= 0:
            record["status"] = "skipped: the run's budget is spent"
            self.say(f"{name}: skipped, the run's budget is spent")
            return None
        self.say(f"{name} ...")
        return record

    def _end(self, name: str, record: dict[str, Any], began: float, error: Exception | None) -> None:
        record["seconds"] = round(time.monotonic() - began, 2)
        if error is None:
            self.say(f"{name}: done in {record['seconds']} s")
            return
        record["status"] = "failed"
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = "".join(traceback.format_exception(error, limit=8))
        self.say(f"{name}: FAILED {record['error']}")

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


# -- building the model ----------------------------------------------------------------------------
def model_config(plan: Plan) -> Any:
    from transformers import GptOssConfig

    if plan.mode == "cpu-smoke":
        from app.models.local_builds import tiny_gpt_oss_config

        return tiny_gpt_oss_config()
    return GptOssConfig(**GPT_OSS_20B)


def build_model(plan: Plan) -> Any:
    """Made on the device itself, in its dtype: no host copy, no checkpoint."""
    from transformers import AutoModelForCausalLM

    config = model_config(plan)
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = AutoModelForCausalLM.from_config(config, dtype=plan.dtype)
    if model.device.type != torch.device(plan.device).type:  # a transformers that built it elsewhere
        model.to(plan.device)
    model.eval()
    synchronize(plan)
    return model


def load_tokenizer(vocab_size: int) -> Any:
    """The o200k_harmony tokenizer: from the tiny-gpt-oss build when it is cached, else built."""
    from transformers import AutoTokenizer

    from app.models.local_builds import TINY_GPT_OSS_BUILD, cache_root

    cached = cache_root() / TINY_GPT_OSS_BUILD
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    from app.models.harmony_tokenizer import build_harmony_tokenizer

    return build_harmony_tokenizer(vocab_size)


def served_weights(plan: Plan, model: Any, tokenizer: Any) -> Any:
    from app.engine.loader import ModelWeights
    from app.models.registry import ModelSource

    name = "gpt-oss-20b-random" if plan.mode == "gpu" else "tiny-gpt-oss-random"
    return ModelWeights(
        source=ModelSource(name, "", (name,)),
        model=model,
        tokenizer=tokenizer,
        device=torch.device(plan.device),
        dtype=plan.dtype,
        harmony=True,
        max_context=int(model.config.max_position_embeddings),
        stop_token_ids=STOP_TOKENS,
        parameters=sum(p.numel() for p in model.parameters()),
    )


def synchronize(plan: Plan) -> None:
    if plan.device.startswith("cuda"):
        torch.cuda.synchronize()


# -- plain generate() ----------------------------------------------------------------------------
def prompt_ids(count: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 190_000, (count, length), generator=generator)


def timed_generate(plan: Plan, model: Any, ids: torch.Tensor, new_tokens: int) -> float:
    ids = ids.to(plan.device)
    synchronize(plan)
    began = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    synchronize(plan)
    return time.perf_counter() - began


def generate_decode_rate(plan: Plan, model: Any, batch: int, tokens: int, limit: float) -> dict[str, float]:
    """Decode tokens/s of plain generate(): (t(n) - t(1)) over n - 1 steps, n fitted to ``limit``."""
    ids = prompt_ids(batch, 16)
    timed_generate(plan, model, ids, 2)  # warm-up
    first = timed_generate(plan, model, ids, 1)
    probe = timed_generate(plan, model, ids, 3)
    step = max((probe - first) / 2, 1e-4)
    steps = max(2, min(tokens - 1, int(limit * 0.6 / step)))
    total = timed_generate(plan, model, ids, steps + 1)
    per_step = (total - first) / steps
    return {"steps": steps, "step_ms": round(per_step * 1000, 2), "tok_s": round(batch / per_step, 1)}


# -- graphs vs eager: the same greedy tokens ------------------------------------------------------------
def graphs_vs_eager(plan: Plan, weights: Any) -> dict[str, Any]:
    """Greedy tokens of one prompt from the static path with graphs, without, and from generate()."""
    from app.engine.params import SamplingParams
    from app.engine.runner import PrefillChunk
    from app.engine.static_runner import StaticModelRunner

    prompt = prompt_ids(1, 40, seed=7)
    greedy = SamplingParams(max_tokens=plan.check_tokens, temperature=0.0)
    out: dict[str, Any] = {}
    for name, graphs in (("graphs", True), ("eager", False)):
        runner = StaticModelRunner(
            weights.model, max_batch_size=1, max_context=256, stop_token_ids=[], cuda_graphs=graphs
        )
        runner.add("check", prompt[0].tolist(), greedy)
        tokens = [runner.prefill([PrefillChunk("check", prompt.shape[1])]).tokens["check"]]
        while len(tokens) < plan.check_tokens:
            tokens.append(runner.decode(["check"]).tokens["check"])
        out[name] = tokens
        if graphs:
            out["graphs_captured"] = runner.graphs.captured
            out["graph_failure"] = runner.graphs.failure
        del runner
    generated = weights.model.generate(
        prompt.to(plan.device),
        attention_mask=torch.ones_like(prompt).to(plan.device),
        max_new_tokens=plan.check_tokens,
        min_new_tokens=plan.check_tokens,
        do_sample=False,
        pad_token_id=0,
    )[0, prompt.shape[1] :].tolist()
    out["generate"] = generated
    out["graphs_equal_eager"] = out["graphs"] == out["eager"]
    out["agree_with_generate"] = next(
        (i for i, (a, b) in enumerate(zip(out["graphs"], generated, strict=True)) if a != b), len(generated)
    )
    return out


# -- this server, over HTTP --------------------------------------------------------------------------
async def one_stream(client: httpx.AsyncClient, prompt: str, tokens: int, tally: StreamTally) -> None:
    await stream_generate(client, generate_body(prompt, tokens), tally)
    if tally.error is not None:
        raise RuntimeError(tally.error)


async def stream_phase(url: str, prompts: list[str], tokens: int, limit: float) -> dict[str, Any]:
    """All streams at once; figures from what arrived, also when the time limit cuts it short."""
    tallies = [StreamTally() for _ in prompts]
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        began = time.perf_counter()
        with trio.move_on_after(limit) as scope:
            async with trio.open_nursery() as nursery:
                for prompt, tally in zip(prompts, tallies, strict=True):
                    nursery.start_soon(one_stream, client, prompt, tokens, tally)
        wall = time.perf_counter() - began
    total = sum(t.tokens for t in tallies)
    decode_rates = [
        (t.tokens - 1) / (t.seconds - t.ttft)
        for t in tallies
        if t.ttft is not None and t.tokens > 1 and t.seconds > t.ttft
    ]
    ttfts = sorted(t.ttft for t in tallies if t.ttft is not None)
    return {
        "streams": len(prompts),
        "complete": not scope.cancelled_caught and all(t.done for t in tallies),
        "tokens": total,
        "wall_s": round(wall, 3),
        "aggregate_tok_s": round(total / wall, 1) if wall > 0 else None,
        "median_stream_decode_tok_s": round(statistics.median(decode_rates), 1) if decode_rates else None,
        "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
        "ttft_p95_s": round(p95, 4) if (p95 := percentile(ttfts, 95)) is not None else None,
    }


def short_prompts(count: int) -> list[str]:
    return [f"Stream {i}: tell me a long story about the sea." for i in range(count)]


def long_prompts(count: int, length: int) -> list[str]:
    """Prompts of exactly ``length`` tokens in the Harmony encoding, different for every stream."""
    from app.prompts.harmony_encoding import harmony_encoding

    encoding = harmony_encoding()
    prompts = []
    for i in range(count):
        head = f"Request {i}:"
        text = head + " hello" * max(1, length - len(encoding.encode(head, allowed_special="all")))
        while len(encoding.encode(text, allowed_special="all")) > length:
            text = text[: -len(" hello")]
        prompts.append(text)
    return prompts


async def server_phases(plan: Plan, weights: Any, report: Report) -> None:
    from hypercorn.trio import serve

    from app.cli import hypercorn_config
    from app.config import ServerConfig, profile_with
    from app.engine.loader import serve_weights
    from app.server import create_server

    profile = profile_with(plan.profile, max_batch_size=plan.max_batch, max_queue=max(512, plan.max_batch * 2))
    config = ServerConfig(
        model=weights.source.model_id,
        port=0,
        profile=profile,
        log_level="warning",
        cuda_graphs=plan.cuda_graphs,
        max_seq_len=plan.max_seq_len,
    )

    def load() -> Any:
        return serve_weights(
            weights,
            max_batch_size=plan.max_batch,
            cuda_graphs=plan.cuda_graphs,
            max_seq_len=plan.max_seq_len,
            precapture_positions=plan.max_seq_len,
        )

    server = create_server(config, loader=load, wait_for_model=True)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def start() -> dict[str, Any]:
            began = time.monotonic()
            app = server.asgi
            serving = functools.partial(serve, app, hypercorn_config(config), shutdown_trigger=shutdown.wait)
            binds = await nursery.start(serving)
            model = server.pipeline.model
            graphs = getattr(getattr(model, "runner", None), "graphs", None)
            return {
                "url": binds[0],
                "start_s": round(time.monotonic() - began, 2),
                "decode_path": getattr(model, "decode_path", None),
                "max_context": getattr(model, "max_context", None),
                "profile": dataclasses.asdict(profile),
                "graphs_captured": graphs.captured if graphs is not None else 0,
                "graph_capture_s": round(graphs.capture_seconds, 2) if graphs is not None else 0,
                "graph_failure": graphs.failure if graphs is not None else None,
            }

        started = await report.arun("server_start", start)
        if started is not None:
            report.info["server"] = {k: v for k, v in started.items() if k != "url"}
            await measure_server(plan, started["url"], report)
        shutdown.set()
        nursery.cancel_scope.deadline = trio.current_time() + 10


async def measure_server(plan: Plan, url: str, report: Report) -> None:
    one = await report.arun(
        "server_1_stream", lambda: stream_phase(url, short_prompts(1), plan.stream_tokens, report.limit("stream_phase"))
    )
    report.figures["server_decode_1"] = one["median_stream_decode_tok_s"] if one else None
    for count in plan.stream_counts:
        many = await report.arun(
            f"server_{count}_streams",
            functools.partial(
                stream_phase, url, short_prompts(count), plan.stream_tokens, report.limit("stream_phase")
            ),
        )
        report.figures[f"server_aggregate_{count}"] = many["aggregate_tok_s"] if many else None
    prompts = long_prompts(plan.ttft_streams, plan.ttft_prompt_tokens)
    ttft = await report.arun(
        "server_ttft", lambda: stream_phase(url, prompts, plan.ttft_max_tokens, report.limit("ttft"))
    )
    report.figures["server_ttft_p95"] = ttft["ttft_p95_s"] if ttft else None
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        stats = (await client.get("/stats")).json()
    # The server's own view (requests by outcome, cache hits: none expected, tokens, latencies).
    report.info["server_stats"] = next(iter(stats.get("model_metrics", {}).values()), stats)


# -- the run ------------------------------------------------------------------------------------------
async def run_check(plan: Plan) -> Report:
    report = Report(plan)
    report.info.update(environment(plan))
    built: list[Any] = []

    def build() -> dict[str, Any]:
        from app.engine.moe_loading import experts_in_use

        model = build_model(plan)
        weights = served_weights(plan, model, load_tokenizer(int(model.config.vocab_size)))
        built.append(weights)
        return {
            "parameters": weights.parameters,
            "experts": experts_in_use(model),
            "attention": str(model.config._attn_implementation),
            "dtype": str(plan.dtype).removeprefix("torch."),
        }

    model_info = report.run("build", build)
    if model_info is None:
        return report
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
        report.run("graphs_vs_eager", lambda: graphs_vs_eager(plan, weights))
        release_memory(plan)
    await server_phases(plan, weights, report)
    if plan.device.startswith("cuda"):
        report.info["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return report


def release_memory(plan: Plan) -> None:
    if plan.device.startswith("cuda"):
        torch.cuda.empty_cache()


def environment(plan: Plan) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "mode": plan.mode,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "dtype"},
    }
    if plan.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


# -- output -------------------------------------------------------------------------------------------
def rows(report: Report) -> list[tuple[str, float | None, float | None, str, str]]:
    """(measure, plain generate(), this server, target, verdict) for the table and the JSON."""
    plan, figures = report.plan, report.figures
    batch, top = plan.generate_batch, max(plan.stream_counts)

    def verdict(value: float | None, target: float, higher: bool) -> str:
        if value is None:
            return "n/a"
        return "met" if (value >= target if higher else value < target) else "MISSED"

    out: list[tuple[str, float | None, float | None, str, str]] = [
        (
            "decode tok/s, 1 stream",
            figures.get("generate_decode_1"),
            figures.get("server_decode_1"),
            f">= {TARGETS['decode_1']:.0f}",
            verdict(figures.get("server_decode_1"), TARGETS["decode_1"], True),
        )
    ]
    for count in plan.stream_counts:
        is_top = count == top
        out.append(
            (
                f"aggregate tok/s, {count} streams",
                figures.get(f"generate_aggregate_{batch}") if count == batch else None,
                figures.get(f"server_aggregate_{count}"),
                f">= {TARGETS['aggregate_64']:.0f}" if is_top else "",
                verdict(figures.get(f"server_aggregate_{count}"), TARGETS["aggregate_64"], True) if is_top else "",
            )
        )
    if batch not in plan.stream_counts:
        out.append((f"aggregate tok/s, batch {batch}", figures.get(f"generate_aggregate_{batch}"), None, "", ""))
    out.append(
        (
            f"p95 TTFT s, {plan.ttft_streams} streams x {plan.ttft_prompt_tokens}-token prompts",
            None,
            figures.get("server_ttft_p95"),
            f"< {TARGETS['ttft_p95']:.0f}",
            verdict(figures.get("server_ttft_p95"), TARGETS["ttft_p95"], False),
        )
    )
    return out


def render(report: Report) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:,.3f}" if value < 10 else f"{value:,.1f}"

    table = rows(report)
    header = ("measure", "plain generate()", "this server", "target", "")
    lines = [header, *((m, cell(g), cell(s), t, v) for m, g, s, t, v in table)]
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    text = [
        "  ".join(col.ljust(widths[i]) if i == 0 else col.rjust(widths[i]) for i, col in enumerate(line))
        for line in lines
    ]
    info = report.info
    where = info.get("gpu") or info.get("cpu", "?")
    server = info.get("server", {})
    model = info.get("model", {})
    title = (
        f"gpu_check ({report.plan.mode}) on {where}: torch {info.get('torch')}, transformers "
        f"{info.get('transformers')}; {model.get('parameters', 0) / 1e9:.2f}B parameters, "
        f"{model.get('dtype')}, experts {model.get('experts')}; server decode path "
        f"{server.get('decode_path')}, {server.get('graphs_captured', 0)} graphs"
    )
    failed = [f"{name}: {p.get('status')}" for name, p in report.phases.items() if p.get("status") != "ok"]
    tail = [f"phase {line}" for line in failed]
    return "\n".join([title, "-" * len(title), *text, *tail, f"total {report.elapsed():.1f} s"])


def to_json(report: Report) -> dict[str, Any]:
    return {
        "info": report.info,
        "rows": [
            {"measure": m, "plain_generate": g, "server": s, "target": t, "verdict": v}
            for m, g, s, t, v in rows(report)
        ],
        "figures": report.figures,
        "phases": report.phases,
        "total_s": round(report.elapsed(), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    plan = smoke_plan(**changes) if args.cpu_smoke else gpu_plan(**changes)

    from app.logging_setup import configure_logging

    configure_logging("warning", "console")
    report = trio.run(run_check, plan)
    print(render(report), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_json(report), indent=2, default=str))
    print(f"figures written to {out}")
    return 0 if all(p.get("status") == "ok" for p in report.phases.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

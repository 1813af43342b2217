"""``python -m app``: parse the command line, then serve with Hypercorn's trio worker."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import structlog
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from app import __version__
from app.config import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_STREAMS_PER_KEY,
    DEFAULT_MODEL,
    DEFAULT_PREFIX_CACHE_MB,
    LOG_LEVELS,
    PROFILES,
    TOOL_CALL_PARSERS,
    ConfigError,
    ServerConfig,
    keys_from_env,
    launch_rank,
    parse_api_keys,
    profile_with,
    split_list,
)
from app.logging_setup import configure_logging
from app.models.generation_defaults import DEFAULT_MAX_TOKENS, generation_config_problem
from app.models.registry import ModelNotFoundError, known_names, resolve
from app.server import Server, create_server, run_follower, stop_tensor_parallel

log = structlog.get_logger("cli")
KEEP_ALIVE_SECONDS = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve a gpt-oss (or any Hugging Face causal LM) model over HTTP: "
        "OpenAI-compatible endpoints, native SSE streaming, /health, /stats and /metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"what to serve: one of {', '.join(known_names())}; a local model folder; or a "
        "Hugging Face hub id (org/name, from the local cache when offline). tiny-gpt-oss and "
        "smollm2-135m are built on this machine on first use and need no network",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the model name clients see (default: the model's id)"
    )
    parser.add_argument("--profile", default="latency_first", choices=sorted(PROFILES), help="scheduler profile")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and compute dtype; auto is bfloat16 on CUDA and float32 on the CPU "
        "(where batched greedy output then equals unbatched output)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="most sequences decoded together (overrides the profile)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="most requests waiting for the batch; more get 429 (overrides the profile)",
    )
    parser.add_argument(
        "--prefill-chunk", type=int, default=None, help="most prompt tokens per prefill step (overrides the profile)"
    )
    parser.add_argument(
        "--step-token-budget",
        type=int,
        default=None,
        help="tokens per mixed step, decoding rows and prompt chunks together: a prompt arriving "
        "while others decode is prefilled alongside them; 0 alternates prefill and decode steps "
        "(overrides the profile)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="static decode path: a KV cache of --max-batch-size slots allocated at start-up and "
        "decode steps captured as CUDA graphs (on the CPU the same path runs without graphs)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="most tokens (prompt + generated) per sequence; default: the model's context, or 4096 "
        "with --cuda-graphs (every slot holds that many positions)",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=DEFAULT_PREFIX_CACHE_MB,
        help="megabytes of the prefix KV cache on the model's device: prompts that start like an "
        "earlier sequence (a shared system prompt, a chat's earlier turns) prefill only the rest; "
        "least recently used out first; 0 turns it off",
    )
    parser.add_argument(
        "--arrival-window-ms",
        type=int,
        default=None,
        help="when the batch is empty, wait this long for more requests before the first prefill "
        "(overrides the profile)",
    )
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log verbosity")
    parser.add_argument(
        "--log-format", default="json", choices=["json", "console"], help="JSON lines or human-readable"
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="seconds a client may stop reading before its request is aborted",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds running streams get to finish after SIGTERM"
    )
    parser.add_argument(
        "--cache-max-entries",
        type=int,
        default=1024,
        help="finished deterministic responses the prompt cache keeps (0 turns it off)",
    )
    parser.add_argument(
        "--cache-max-mb", type=float, default=64.0, help="megabytes the prompt cache may hold (least recently used out)"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections with a request in progress; more get 503 (/health and /metrics excepted)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="require Authorization: Bearer KEY on /v1/* and /generate; several keys comma-separated "
        "(KEY1,KEY2) or the flag repeated, each a tenant; also GPTOSS_API_KEY, read the same way",
    )
    parser.add_argument(
        "--allowed-origins",
        default=None,
        help="comma-separated web origins that get CORS headers ('*' for any); default: none",
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=300.0,
        help="seconds a model step may run before /health says stalled (503) and it is logged",
    )
    parser.add_argument(
        "--max-streams",
        type=int,
        default=DEFAULT_MAX_STREAMS,
        help="open generation streams at once, cache replays included; more get 429",
    )
    parser.add_argument(
        "--max-streams-per-key",
        type=int,
        default=DEFAULT_MAX_STREAMS_PER_KEY,
        help="open generation streams one API key may hold at once (every unkeyed caller together "
        "counts as one key); more get 429, and the other keys keep theirs",
    )
    parser.add_argument(
        "--max-tokens-default",
        type=int,
        default=None,
        metavar="N",
        help="max_tokens for a request that sets none (capped by the room its prompt leaves); "
        f"default: the generation config's max_new_tokens, else {DEFAULT_MAX_TOKENS}; 0: the rest of the context",
    )
    parser.add_argument(
        "--generation-config",
        default="auto",
        metavar="auto|vllm|FOLDER",
        help="default sampling for the fields a request leaves out (vLLM's flag): auto takes the model "
        "card's recommendation and the model's generation_config.json, vllm the neutral values "
        "(temperature 1, top_p 1), FOLDER that folder's generation_config.json",
    )
    parser.add_argument(
        "--responses-db",
        default=None,
        help="the SQLite file /v1/responses stores responses in (':memory:' keeps nothing on disk); "
        "default: responses.db under the cache folder (GPTOSS_CACHE_DIR or ~/.cache/gptoss-hf-server)",
    )
    parser.add_argument(
        "--responses-max-count", type=int, default=10_000, help="most stored responses (oldest out first)"
    )
    parser.add_argument(
        "--responses-max-mb", type=float, default=256.0, help="megabytes the response store may hold (oldest out first)"
    )
    parser.add_argument(
        "--responses-ttl",
        type=float,
        default=30 * 24 * 3600,
        help="seconds a stored response is kept (30 days)",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        metavar="URL",
        help="replicas: keep the prompt cache and the /v1/responses store in this Redis (redis://HOST:PORT/DB), "
        "shared by every server pointed at it; default: the embedded ones (also GPTOSS_REDIS_URL)",
    )
    parser.add_argument(
        "--redis-cache-ttl",
        type=float,
        default=24 * 3600,
        help="seconds a cached answer is kept in Redis (each hit renews it); with --redis-url",
    )
    parser.add_argument(
        "--redis-timeout",
        type=float,
        default=0.5,
        help="seconds a Redis call may take before the request goes on without it (a miss); with --redis-url",
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="PATH",
        help="a Jinja chat template file that replaces the model's own (for instance one that renders "
        "tools and <tool_call> calls, so that tool_choice auto is served)",
    )
    parser.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=TOOL_CALL_PARSERS,
        help="how a model without Harmony writes tool calls (tool_choice auto): auto reads the syntax "
        "its chat template teaches (hermes <tool_call> JSON, llama3_json), none refuses auto",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="shard the model over N ranks with transformers' tensor-parallel plan (NCCL on GPUs, "
        "gloo on the CPU); launch with torchrun --nproc-per-node N -m app ...: rank 0 serves HTTP",
    )
    parser.add_argument(
        "--expert-parallel",
        "--enable-expert-parallel",  # vLLM's spelling
        dest="expert_parallel",
        action="store_true",
        help="with --tensor-parallel-size N: also shard a MoE model's experts over the N ranks "
        "(transformers' expert-parallel plan), each rank holding 1/N of them",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    profile = profile_with(
        args.profile,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        prefill_chunk_tokens=args.prefill_chunk,
        step_token_budget=args.step_token_budget,
        arrival_window_ms=args.arrival_window_ms,
    )
    return ServerConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        profile=profile,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        log_level=args.log_level,
        log_format=args.log_format,
        stall_timeout=args.stall_timeout,
        drain_timeout=args.drain_timeout,
        cache_max_entries=args.cache_max_entries,
        cache_max_bytes=int(args.cache_max_mb * 1024 * 1024),
        max_streams=args.max_streams,
        max_streams_per_key=args.max_streams_per_key,
        max_tokens_default=args.max_tokens_default,
        generation_config=args.generation_config,
        step_timeout=args.step_timeout,
        max_connections=args.max_connections,
        api_keys=parse_api_keys(args.api_key) if args.api_key else keys_from_env(),
        allowed_origins=split_list(args.allowed_origins),
        cuda_graphs=args.cuda_graphs,
        max_seq_len=args.max_seq_len,
        prefix_cache_bytes=int(args.prefix_cache_mb * 1024 * 1024),
        responses_db=args.responses_db,
        responses_max_count=args.responses_max_count,
        responses_max_bytes=int(args.responses_max_mb * 1024 * 1024),
        responses_ttl=args.responses_ttl,
        redis_url=args.redis_url or os.environ.get("GPTOSS_REDIS_URL") or None,
        redis_cache_ttl=args.redis_cache_ttl,
        redis_timeout=args.redis_timeout,
        chat_template=args.chat_template,
        tool_call_parser=args.tool_call_parser,
        tensor_parallel_size=args.tensor_parallel_size,
        expert_parallel=args.expert_parallel,
    )


def hypercorn_config(config: ServerConfig) -> HypercornConfig:
    hyper = HypercornConfig()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hyper.bind = [f"{host}:{config.port}"]
    hyper.worker_class = "trio"
    hyper.accesslog = logging.getLogger("hypercorn.access")
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.graceful_timeout = 5.0
    # An idle connection, or one that has not sent a whole request head (slow-loris), is closed
    # after this long; the same as hypercorn.toml says for the plain Hypercorn CLI.
    hyper.keep_alive_timeout = KEEP_ALIVE_SECONDS
    return hyper


async def serve_until_stopped(config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT (which drain first) or a failed model load (exit code 1)."""
    exit_code = 0
    shutdown = trio.Event()

    def fatal(message: str) -> None:
        nonlocal exit_code
        exit_code = 1
        print(f"error: {message}", file=sys.stderr, flush=True)
        shutdown.set()

    server = create_server(config, wait_for_model=False, on_fatal=fatal)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, server, config, shutdown)
            binds = await nursery.start(_serve, server, config, shutdown)
            log.info("listening", urls=binds, model=config.model, profile=config.profile.name)
            await shutdown.wait()
            nursery.cancel_scope.deadline = trio.current_time() + 10  # hypercorn's own graceful close
    finally:
        if config.tensor_parallel_size > 1:
            stop_tensor_parallel(server)  # the other ranks stop with this one, whatever ended it
    return exit_code


async def _serve(
    server: Server, config: ServerConfig, shutdown: trio.Event, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    await serve(server.asgi, hypercorn_config(config), shutdown_trigger=shutdown.wait, task_status=task_status)


async def _stop_on_signal(server: Server, config: ServerConfig, shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal", signal=signal.Signals(signum).name, drain_timeout_s=config.drain_timeout)
            await server.pipeline.drain(config.drain_timeout)
            shutdown.set()
            return


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        rank = launch_rank(config.tensor_parallel_size, os.environ)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    if config.chat_template is not None and not os.path.isfile(config.chat_template):
        print(f"error: --chat-template {config.chat_template}: no such file", file=sys.stderr)
        return 2
    if (problem := generation_config_problem(config.generation_config)) is not None:
        print(f"error: --generation-config {config.generation_config}: {problem}", file=sys.stderr)
        return 2
    try:
        resolve(config.model, config.served_model_name)
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if rank > 0:
        return run_follower(config)  # no HTTP: this rank runs the steps rank 0 sends
    try:
        return trio.run(serve_until_stopped, config)
    except KeyboardInterrupt:
        return 130

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
from app.config import ConfigError, ServerConfig, launch_rank
from app.config.declare import add_flags, values_from_args
from app.logging_setup import configure_logging
from app.models.generation_defaults import DEFAULT_MAX_TOKENS, generation_config_problem
from app.models.registry import ModelNotFoundError, known_names, resolve
from app.server import Server, create_server, run_follower, stop_tensor_parallel

log = structlog.get_logger("cli")
KEEP_ALIVE_SECONDS = 5.0


def build_parser() -> argparse.ArgumentParser:
    """The flags of every setting ServerConfig declares (app.config: add a flag there)."""
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve a gpt-oss (or any Hugging Face causal LM) model over HTTP: "
        "OpenAI-compatible endpoints, native SSE streaming, /health, /stats and /metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_flags(parser, ServerConfig, {"models": ", ".join(known_names()), "max_tokens": DEFAULT_MAX_TOKENS})
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**values_from_args(ServerConfig, args, os.environ))


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

    try:
        server = create_server(config, wait_for_model=False, on_fatal=fatal)
    except ConfigError as error:  # what the wiring finds it cannot set up (the reasoning key's file)
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, server, config, shutdown)
            binds = await nursery.start(_serve, server, config, shutdown)
            log.info("listening", urls=binds, model=config.model, profile=config.profile.name)
            await shutdown.wait()
            nursery.cancel_scope.deadline = trio.current_time() + 10  # hypercorn's own graceful close
    except BaseException:
        exit_code = 1
        raise
    finally:
        if config.tensor_parallel_size > 1:
            # The other ranks stop with this one, whatever ended it; this process exits there.
            stop_tensor_parallel(server, exit_code)
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

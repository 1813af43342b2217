"""The ASGI app for the plain Hypercorn CLI: ``hypercorn --config hypercorn.toml app.asgi:app``.

Hypercorn imports this module and takes ``app``; the model and settings come from environment
variables (the CLI has no flags of ours):

    GPTOSS_MODEL (default 20b), GPTOSS_PROFILE (latency_first), GPTOSS_DTYPE (auto),
    GPTOSS_DEVICE (auto), GPTOSS_MAX_BATCH_SIZE, GPTOSS_MAX_QUEUE, GPTOSS_PREFILL_CHUNK, GPTOSS_STEP_TOKEN_BUDGET,
    GPTOSS_ARRIVAL_WINDOW_MS,
    GPTOSS_SERVED_MODEL_NAME, GPTOSS_LOG_LEVEL (info), GPTOSS_LOG_FORMAT (json),
    GPTOSS_CUDA_GRAPHS (1 turns on the static decode path), GPTOSS_MAX_SEQ_LEN, GPTOSS_MAX_STREAMS,
    GPTOSS_MAX_STREAMS_PER_KEY, GPTOSS_MAX_TOKENS_DEFAULT, GPTOSS_GENERATION_CONFIG (auto, vllm or a folder),
    GPTOSS_STEP_TIMEOUT, GPTOSS_PREFIX_CACHE_MB (1024; 0 turns the prefix KV cache off),
    GPTOSS_MAX_CONNECTIONS, GPTOSS_API_KEY (comma-separated keys), GPTOSS_ALLOWED_ORIGINS,
    GPTOSS_REDIS_URL (replicas sharing a Redis), GPTOSS_REDIS_CACHE_TTL (86400), GPTOSS_REDIS_TIMEOUT (0.5)

The model loads during start-up: Hypercorn accepts connections once it is ready, and a model that
cannot load fails start-up. If the pipeline dies later (an actor's fault), the process exits with
status 1 a moment after the open streams got their error event, for the supervisor to restart it
(Hypercorn's CLI gives the app no way to stop it with a status of its own).
"""

from __future__ import annotations

import os
import sys
import threading

from app.config import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_STREAMS_PER_KEY,
    DEFAULT_MODEL,
    DEFAULT_PREFIX_CACHE_MB,
    ServerConfig,
    keys_from_env,
    profile_with,
    split_list,
)
from app.logging_setup import configure_logging
from app.server import create_server


def _int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def config_from_env() -> ServerConfig:
    profile = profile_with(
        os.environ.get("GPTOSS_PROFILE", "latency_first"),
        max_batch_size=_int("GPTOSS_MAX_BATCH_SIZE"),
        max_queue=_int("GPTOSS_MAX_QUEUE"),
        prefill_chunk_tokens=_int("GPTOSS_PREFILL_CHUNK"),
        step_token_budget=_int("GPTOSS_STEP_TOKEN_BUDGET"),
        arrival_window_ms=_int("GPTOSS_ARRIVAL_WINDOW_MS"),
    )
    return ServerConfig(
        model=os.environ.get("GPTOSS_MODEL", DEFAULT_MODEL),
        served_model_name=os.environ.get("GPTOSS_SERVED_MODEL_NAME") or None,
        profile=profile,
        dtype=os.environ.get("GPTOSS_DTYPE", "auto"),
        device=os.environ.get("GPTOSS_DEVICE", "auto"),
        log_level=os.environ.get("GPTOSS_LOG_LEVEL", "info"),
        log_format=os.environ.get("GPTOSS_LOG_FORMAT", "json"),  # type: ignore[arg-type]
        cuda_graphs=os.environ.get("GPTOSS_CUDA_GRAPHS", "0").lower() in ("1", "true", "yes", "on"),
        max_seq_len=_int("GPTOSS_MAX_SEQ_LEN"),
        prefix_cache_bytes=int(float(os.environ.get("GPTOSS_PREFIX_CACHE_MB", DEFAULT_PREFIX_CACHE_MB)) * 1024 * 1024),
        max_streams=_int("GPTOSS_MAX_STREAMS") or DEFAULT_MAX_STREAMS,
        max_streams_per_key=_int("GPTOSS_MAX_STREAMS_PER_KEY") or DEFAULT_MAX_STREAMS_PER_KEY,
        max_tokens_default=_int("GPTOSS_MAX_TOKENS_DEFAULT"),
        generation_config=os.environ.get("GPTOSS_GENERATION_CONFIG") or "auto",
        step_timeout=float(os.environ.get("GPTOSS_STEP_TIMEOUT", "300")),
        max_connections=_int("GPTOSS_MAX_CONNECTIONS") or DEFAULT_MAX_CONNECTIONS,
        api_keys=keys_from_env(),
        allowed_origins=split_list(os.environ.get("GPTOSS_ALLOWED_ORIGINS")),
        redis_url=os.environ.get("GPTOSS_REDIS_URL") or None,
        redis_cache_ttl=float(os.environ.get("GPTOSS_REDIS_CACHE_TTL", "86400")),
        redis_timeout=float(os.environ.get("GPTOSS_REDIS_TIMEOUT", "0.5")),
    )


# Seconds between a fatal pipeline failure and the exit: the open streams' error events go out.
EXIT_GRACE_SECONDS = 2.0


def exit_soon(message: str) -> None:
    print(f"error: {message}; exiting in {EXIT_GRACE_SECONDS:.0f} s", file=sys.stderr, flush=True)
    threading.Timer(EXIT_GRACE_SECONDS, os._exit, args=(1,)).start()


_config = config_from_env()
configure_logging(_config.log_level, _config.log_format)
app = create_server(_config, wait_for_model=True, on_fatal=exit_soon).asgi

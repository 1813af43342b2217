"""Server configuration: frozen, validated at construction, with named scheduler profiles."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

LogFormat = Literal["json", "console"]
# What ``python -m app`` and ``hypercorn ... app.asgi:app`` serve when no model is named.
DEFAULT_MODEL = "20b"
DEFAULT_MAX_STREAMS = 256
# One tenant's share of DEFAULT_MAX_STREAMS: four tenants that open streams and never read them
# still leave a fifth its own.
DEFAULT_MAX_STREAMS_PER_KEY = 64
DEFAULT_MAX_CONNECTIONS = 512
# About 40,000 tokens of gpt-oss-20b prefixes in bfloat16 (its full-attention layers' keys; the
# sliding layers keep only the window before each stored end), about 22,000 of SmolLM2 in fp32.
DEFAULT_PREFIX_CACHE_MB = 1024
LOG_LEVELS = ("debug", "info", "warning", "error")
# How tool calls in a chat template's own syntax are read back (app.text.template_calls): auto
# picks the syntax the template teaches; none reads none (tool_choice "auto" is then refused).
ToolCallParser = Literal["auto", "hermes", "llama3_json", "none"]
TOOL_CALL_PARSERS: tuple[ToolCallParser, ...] = ("auto", "hermes", "llama3_json", "none")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names it."""


@dataclass(frozen=True, slots=True)
class Profile:
    """A named set of scheduler settings; each can be overridden on its own."""

    name: str
    max_batch_size: int
    max_queue: int  # requests waiting beyond the batch; more get 429
    prefill_chunk_tokens: int  # prompt tokens per prefill step, all sequences together
    max_consecutive_prefills: int  # prefill steps in a row before the running batch decodes
    # When the batch is empty and a request arrives, wait this long for others before the first
    # prefill: clients that were answered in the same step come back together, and one prefill
    # of all of them beats a lone one that the others then wait behind (p95 TTFT).
    arrival_window_ms: int = 2
    # Tokens one mixed step carries, decoding rows and prompt chunks together: a prompt that
    # arrives while others decode is prefilled in the room the decoding rows leave, in the same
    # forward as their tokens (chunked prefill), so the running streams are not stalled by it.
    # 0: no mixed steps (prefill steps and decode steps alternate, max_consecutive_prefills).
    step_token_budget: int = 0
    # The most a mixed step may take, as a multiple of a decode step, once both have been measured:
    # its prompt chunk is sized to keep within it (app.batching.step_pace). 0: the budget alone.
    mixed_step_slowdown: float = 0.0

    def __post_init__(self) -> None:
        for field in ("max_batch_size", "max_queue", "prefill_chunk_tokens", "max_consecutive_prefills"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"profile {self.name}: {field} must be a positive integer, got {value!r}")
        window = self.arrival_window_ms
        if not isinstance(window, int) or isinstance(window, bool) or not 0 <= window <= 1000:
            raise ConfigError(f"profile {self.name}: arrival_window_ms must be 0..1000, got {window!r}")
        budget = self.step_token_budget
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ConfigError(f"profile {self.name}: step_token_budget must be 0 or more, got {budget!r}")
        slowdown = self.mixed_step_slowdown
        if not isinstance(slowdown, int | float) or isinstance(slowdown, bool) or not (slowdown == 0 or slowdown > 1):
            raise ConfigError(f"profile {self.name}: mixed_step_slowdown must be 0 or more than 1, got {slowdown!r}")


PROFILES = {
    # The seed's: new prompts are prefilled first and in small chunks, batches stay moderate, the
    # queue is short so overload is refused early rather than answered late.
    # A prompt that arrives while others decode rides along in mixed steps of up to 256 tokens,
    # fewer where that would make the step more than 1.8x a decode step (the streams' latency).
    "latency_first": Profile(
        "latency_first",
        max_batch_size=16,
        max_queue=64,
        prefill_chunk_tokens=512,
        max_consecutive_prefills=2,
        step_token_budget=256,
        mixed_step_slowdown=1.6,
    ),
    # Fill the batch: more rows, longer prefill chunks, a deeper queue.
    "throughput_first": Profile(
        "throughput_first",
        max_batch_size=64,
        max_queue=512,
        prefill_chunk_tokens=2048,
        max_consecutive_prefills=4,
        arrival_window_ms=5,
        step_token_budget=2048,
    ),
}


def profile_with(name: str, **overrides: int | None) -> Profile:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}: use one of {', '.join(PROFILES)}")
    chosen: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
    return dataclasses.replace(PROFILES[name], **chosen)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Every setting, built once (from the command line or the environment) and passed down: the
    scheduler reads its profile, the pipeline its timeouts and cache bounds, the routes the rest."""

    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    profile: Profile = PROFILES["latency_first"]
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    device: str = "auto"
    log_level: str = "info"
    log_format: LogFormat = "json"
    stall_timeout: float = 30.0  # seconds a client may stop reading before its request is aborted
    max_body_bytes: int = 4 * 1024 * 1024
    drain_timeout: float = 30.0  # seconds running streams get to finish on SIGTERM
    heartbeat_seconds: float = 15.0  # SSE comment lines while a stream waits (proxies drop idle ones)
    cache_max_entries: int = 1024  # finished deterministic responses kept; 0 turns the cache off
    cache_max_bytes: int = 64 * 1024 * 1024
    # Open generation streams (cache replays included) at once; past it a request gets 429. The
    # queue bounds only what waits for the GPU: a cache hit never queues.
    max_streams: int = DEFAULT_MAX_STREAMS
    # Of those, what one tenant (an API key; every unkeyed caller together is one) may hold at once.
    max_streams_per_key: int = DEFAULT_MAX_STREAMS_PER_KEY
    # max_tokens for a request that sets none (None: the generation config's max_new_tokens, else
    # app.models.generation_defaults.DEFAULT_MAX_TOKENS; 0: the rest of the context), capped by it.
    max_tokens_default: int | None = None
    # Where default sampling comes from (vLLM's --generation-config): "auto" (the model card's
    # recommendation and the model's generation_config.json), "vllm" (neutral), or a folder.
    generation_config: str = "auto"
    # A trip to the worker thread that runs longer than this (a stuck kernel, a deadlock) turns
    # /health into 503 "stalled" and is logged; generous, as a long prefill on a CPU takes seconds.
    step_timeout: float = 300.0
    # Connections with a request in progress; past it 503 (/health and /metrics still answer).
    # Hypercorn closes an idle connection after 5 s (keep_alive_timeout), so those are bounded
    # in time rather than in number.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # Bearer keys /v1/* and /generate require (none: open); each key is a tenant of the cache.
    api_keys: tuple[str, ...] = ()
    # Web origins that get CORS headers ("*" for any); none: no CORS headers at all.
    allowed_origins: tuple[str, ...] = ()
    # The static decode path: a slot cache allocated at start-up and decode steps captured as CUDA
    # graphs (eager without CUDA). Off by default until it has been measured on a GPU.
    cuda_graphs: bool = False
    max_seq_len: int | None = None  # prompt + generated tokens per sequence; None: the model's context
    # The prefix KV cache: keys and values that finished and running sequences leave behind, reused
    # by prompts that start with the same tokens (a shared system prompt, a chat's earlier turns);
    # bytes it may hold on the model's device, least recently used out first. 0 turns it off.
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_MB * 1024 * 1024
    # The /v1/responses store: a SQLite file (None: responses.db under the user's cache folder;
    # ":memory:": nothing on disk), bounded by count, bytes and age (seconds), oldest out first.
    responses_db: str | None = None
    responses_max_count: int = 10_000
    responses_max_bytes: int = 256 * 1024 * 1024
    responses_ttl: float = 30 * 24 * 3600.0
    # Replicas: a Redis that holds the prompt cache's shared tier and the /v1/responses store (None:
    # the embedded ones), each cached answer for redis_cache_ttl seconds; every Redis call gives up
    # after about redis_timeout seconds (an outage is a cache miss, not a slow request).
    redis_url: str | None = None
    redis_cache_ttl: float = 24 * 3600.0
    redis_timeout: float = 0.5
    # A Jinja chat template file that replaces the tokenizer's (None: the model's own), and how
    # tool calls in its syntax are read back from the output.
    chat_template: str | None = None
    tool_call_parser: ToolCallParser = "auto"
    # Ranks the model is sharded over (transformers' tensor-parallel plan, torch.distributed): the
    # process is one of N launched by torchrun; rank 0 serves HTTP and every rank runs each step.
    tensor_parallel_size: int = 1
    # With tensor_parallel_size N > 1: also shard a MoE model's experts over the N ranks (its
    # expert-parallel plan), each rank holding whole experts, 1/N of them.
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.log_format not in ("json", "console"):
            raise ConfigError(f"log format must be json or console, got {self.log_format!r}")
        for field in ("stall_timeout", "drain_timeout", "heartbeat_seconds", "step_timeout"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")
        if self.cache_max_entries < 0 or self.cache_max_bytes < 0:
            raise ConfigError("cache bounds must not be negative")
        if self.max_streams < 1 or self.max_connections < 1 or self.max_streams_per_key < 1:
            raise ConfigError("max_streams, max_streams_per_key and max_connections must be at least 1")
        if self.max_tokens_default is not None and (
            isinstance(self.max_tokens_default, bool) or self.max_tokens_default < 0
        ):
            raise ConfigError(
                f"max_tokens_default must be 0 (the rest of the context) or more, got {self.max_tokens_default!r}"
            )
        if not self.generation_config.strip():
            raise ConfigError("generation_config must be auto, vllm or a folder holding generation_config.json")
        if any(len(key) < 8 or any(c.isspace() for c in key) for key in self.api_keys):
            raise ConfigError("an API key must be at least 8 characters, without spaces")
        if self.max_seq_len is not None and (isinstance(self.max_seq_len, bool) or self.max_seq_len < 2):
            raise ConfigError(f"max_seq_len must be at least 2 tokens, got {self.max_seq_len!r}")
        if self.responses_max_count < 1 or self.responses_max_bytes < 1 or not self.responses_ttl > 0:
            raise ConfigError("the response store's limits (count, megabytes, ttl) must be positive")
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
        if not self.redis_cache_ttl > 0 or not self.redis_timeout > 0:
            raise ConfigError("redis_cache_ttl and redis_timeout must be positive")
        if self.prefix_cache_bytes < 0:
            raise ConfigError(f"prefix_cache_bytes must not be negative, got {self.prefix_cache_bytes}")
        if isinstance(self.tensor_parallel_size, bool) or self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size!r}")
        if self.tensor_parallel_size > 1 and self.cuda_graphs:
            # Captured decode steps would hold the ranks' collectives: not built (nor measured) yet.
            raise ConfigError("--cuda-graphs does not work with --tensor-parallel-size > 1 yet")
        if self.expert_parallel and self.tensor_parallel_size == 1:
            raise ConfigError(
                "--expert-parallel shards the experts over the ranks of --tensor-parallel-size N (N > 1, "
                "under torchrun --nproc-per-node N); on one rank there is nothing to shard them over"
            )
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            choices = ", ".join(TOOL_CALL_PARSERS)
            raise ConfigError(f"tool_call_parser must be one of {choices}, got {self.tool_call_parser!r}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")


def check_redis_url(url: str) -> None:
    """redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss:// (TLS) or unix://PATH; never echoes a
    password back."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    well_formed = (parts.scheme == "unix" and bool(parts.path)) or (
        parts.scheme in ("redis", "rediss") and bool(parts.hostname)
    )
    database = parts.path.strip("/") if parts.scheme != "unix" else "0"
    if not well_formed or port == -1 or not (database == "" or database.isdigit()):
        raise ConfigError(
            f"redis_url must be redis://HOST[:PORT][/DB], rediss://... or unix://PATH, got {parts.scheme}://..."
        )


def launch_rank(tensor_parallel_size: int, env: Mapping[str, str]) -> int:
    """This process's rank among those torchrun started (0 without torchrun), checked against
    --tensor-parallel-size: a ConfigError says what does not match."""
    world = env.get("WORLD_SIZE")
    if tensor_parallel_size == 1:
        if world not in (None, "1"):
            raise ConfigError(
                f"torchrun started {world} ranks: pass --tensor-parallel-size {world} (or start one process)"
            )
        return 0
    command = f"torchrun --nproc-per-node {tensor_parallel_size} -m app --tensor-parallel-size {tensor_parallel_size}"
    if world is None or "RANK" not in env:
        raise ConfigError(f"--tensor-parallel-size {tensor_parallel_size} runs one process per rank: {command} ...")
    if world != str(tensor_parallel_size):
        raise ConfigError(f"--tensor-parallel-size {tensor_parallel_size}, but torchrun started {world} ranks")
    return int(env["RANK"])


def split_list(value: str | None) -> tuple[str, ...]:
    """A comma-separated list (a flag's or an environment variable's)."""
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def parse_api_keys(values: Iterable[str]) -> tuple[str, ...]:
    """--api-key's values as keys: each value may hold several, comma-separated, as
    GPTOSS_API_KEY does, so that the flag and the variable read ``k1,k2`` alike (two keys)."""
    return tuple(dict.fromkeys(key for value in values for key in split_list(value)))


def keys_from_env() -> tuple[str, ...]:
    # A key given in the environment stays out of `ps` and the shell's history.
    return parse_api_keys([os.environ.get("GPTOSS_API_KEY") or ""])

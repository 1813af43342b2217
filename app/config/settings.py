"""The server's settings, one frozen dataclass per concern, each setting declared once.

Each field is a setting (app.config.declare): its default here is its flag's default, its help
the flag's help, and its GPTOSS_* variable is named after its flag. ServerConfig is every
concern together, flat (``config.stall_timeout``), and is itself each concern's settings: the
loader takes it as ModelSettings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.config.declare import setting
from app.config.model import MIB, ModelSettings
from app.config.profiles import PROFILES, Profile, profile_with
from app.config.values import ConfigError, check_positive, check_redis_url, split_list

LogFormat = Literal["json", "console"]
MIN_REASONING_KEY = 32  # characters: `openssl rand -base64 32` gives 44
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class SchedulingSettings:
    """The scheduler's profile and the watchdog of its steps."""

    profile: Profile = setting(
        PROFILES["latency_first"],
        "--profile",
        choices=tuple(sorted(PROFILES)),
        preset=profile_with,
        overrides=Profile,
        help="scheduler profile",
    )
    # Generous: a long prefill on a CPU takes seconds; a stuck kernel or a deadlock takes forever.
    step_timeout: float = setting(
        300.0,
        "--step-timeout",
        read=float,
        help="seconds a model step may run before /health says stalled (503) and it is logged",
    )

    def __post_init__(self) -> None:
        check_positive(self, "step_timeout")


@dataclass(frozen=True)
class HttpSettings:
    """Where the server listens, what a request may send and how long it waits on its clients."""

    host: str = setting("127.0.0.1", "--host", cli_only=True, help="address to listen on (0.0.0.0 for all interfaces)")
    port: int = setting(8000, "--port", read=int, cli_only=True, help="TCP port (0 picks a free one)")
    stall_timeout: float = setting(
        30.0,
        "--stall-timeout",
        read=float,
        help="seconds a client may stop reading before its request is aborted",
    )
    drain_timeout: float = setting(
        30.0,
        "--drain-timeout",
        read=float,
        cli_only=True,  # under the Hypercorn CLI, its graceful_timeout drains
        help="seconds running streams get to finish after SIGTERM",
    )
    max_body_bytes: int = 4 * MIB
    heartbeat_seconds: float = 15.0  # SSE comment lines while a stream waits (proxies drop idle ones)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        for field in ("stall_timeout", "drain_timeout", "heartbeat_seconds"):
            check_positive(self, field)
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")


@dataclass(frozen=True)
class AccessSettings:
    """Who may call (each API key a tenant, each web origin let in) and how much they may hold open."""

    api_keys: tuple[str, ...] = setting(
        (),
        "--api-key",
        read=split_list,
        repeat=True,
        env_in_cli=True,
        help="require Authorization: Bearer KEY on /v1/* and /generate; several keys comma-separated "
        "(KEY1,KEY2) or the flag repeated, each a tenant; also GPTOSS_API_KEY, read the same way",
    )
    # Idle connections are not counted: Hypercorn closes one after 5 s (keep_alive_timeout), so
    # those are bounded in time rather than in number.
    max_connections: int = setting(
        512,
        "--max-connections",
        read=int,
        help="connections with a request in progress; more get 503 (/health and /metrics excepted)",
    )
    allowed_origins: tuple[str, ...] = setting(
        (),
        "--allowed-origins",
        read=split_list,
        help="comma-separated web origins that get CORS headers ('*' for any); default: none",
    )
    # The profile's queue bounds only what waits for the GPU (a cache hit never queues); this
    # bounds what is held open.
    max_streams: int = setting(
        256,
        "--max-streams",
        read=int,
        help="open generation streams at once, cache replays included; more get 429",
    )
    # A quarter of max_streams: four tenants that open streams and never read them still leave a
    # fifth its own.
    max_streams_per_key: int = setting(
        64,
        "--max-streams-per-key",
        read=int,
        help="open generation streams one API key may hold at once (every unkeyed caller together "
        "counts as one key); more get 429, and the other keys keep theirs",
    )

    def __post_init__(self) -> None:
        if self.max_streams < 1 or self.max_connections < 1 or self.max_streams_per_key < 1:
            raise ConfigError("max_streams, max_streams_per_key and max_connections must be at least 1")
        if any(len(key) < 8 or any(c.isspace() for c in key) for key in self.api_keys):
            raise ConfigError("an API key must be at least 8 characters, without spaces")


@dataclass(frozen=True)
class StoreSettings:
    """The prompt cache, the /v1/responses store, the Redis replicas share, the reasoning seal."""

    cache_max_entries: int = setting(
        1024,
        "--cache-max-entries",
        read=int,
        help="finished deterministic responses the prompt cache keeps (0 turns it off)",
    )
    cache_max_bytes: int = setting(
        64 * MIB,
        "--cache-max-mb",
        read=float,
        unit=MIB,
        help="megabytes the prompt cache may hold (least recently used out)",
    )
    responses_db: str | None = setting(
        None,
        "--responses-db",
        help="the SQLite file /v1/responses stores responses in (':memory:' keeps nothing on disk); "
        "default: responses.db under the cache folder (GPTOSS_CACHE_DIR or ~/.cache/gptoss-hf-server)",
    )
    responses_max_count: int = setting(
        10_000, "--responses-max-count", read=int, help="most stored responses (oldest out first)"
    )
    responses_max_bytes: int = setting(
        256 * MIB,
        "--responses-max-mb",
        read=float,
        unit=MIB,
        help="megabytes the response store may hold (oldest out first)",
    )
    responses_ttl: float = setting(
        30 * 24 * 3600, "--responses-ttl", read=float, help="seconds a stored response is kept (30 days)"
    )
    redis_url: str | None = setting(
        None,
        "--redis-url",
        metavar="URL",
        env_in_cli=True,
        help="replicas: keep the prompt cache and the /v1/responses store in this Redis (redis://HOST:PORT/DB), "
        "shared by every server pointed at it; default: the embedded ones (also GPTOSS_REDIS_URL)",
    )
    redis_cache_ttl: float = setting(
        24 * 3600,
        "--redis-cache-ttl",
        read=float,
        help="seconds a cached answer is kept in Redis (each hit renews it); with --redis-url",
    )
    # Short: a Redis outage is a cache miss, not a slow request.
    redis_timeout: float = setting(
        0.5,
        "--redis-timeout",
        read=float,
        help="seconds a Redis call may take before the request goes on without it (a miss); with --redis-url",
    )
    # app.store.reasoning_seal; not in repr: a secret.
    reasoning_key: str | None = setting(
        None,
        "--reasoning-key",
        metavar="SECRET",
        env_in_cli=True,
        repr=False,
        help="the secret (32+ characters) that seals reasoning items' encrypted_content; replicas share "
        "one; default: one generated once beside the response store (also GPTOSS_REASONING_KEY)",
    )

    def __post_init__(self) -> None:
        if self.cache_max_entries < 0 or self.cache_max_bytes < 0:
            raise ConfigError("cache bounds must not be negative")
        if self.responses_max_count < 1 or self.responses_max_bytes < 1 or not self.responses_ttl > 0:
            raise ConfigError("the response store's limits (count, megabytes, ttl) must be positive")
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
        if self.reasoning_key is not None and (
            len(self.reasoning_key) < MIN_REASONING_KEY or any(c.isspace() for c in self.reasoning_key)
        ):
            # Never echoed: it is a secret.
            raise ConfigError(f"the reasoning key must be at least {MIN_REASONING_KEY} characters, without spaces")
        if not self.redis_cache_ttl > 0 or not self.redis_timeout > 0:
            raise ConfigError("redis_cache_ttl and redis_timeout must be positive")


@dataclass(frozen=True)
class LogSettings:
    log_level: str = setting("info", "--log-level", choices=LOG_LEVELS, help="log verbosity")
    log_format: LogFormat = setting(
        "json", "--log-format", choices=("json", "console"), help="JSON lines or human-readable"
    )

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.log_format not in ("json", "console"):
            raise ConfigError(f"log format must be json or console, got {self.log_format!r}")


# The concerns in the order their flags are listed (a dataclass lists its bases' fields last
# base first: ServerConfig names them in reverse).
CONCERNS = (ModelSettings, SchedulingSettings, HttpSettings, AccessSettings, StoreSettings, LogSettings)


@dataclass(frozen=True)
class ServerConfig(LogSettings, StoreSettings, AccessSettings, HttpSettings, SchedulingSettings, ModelSettings):
    """Every setting, built once (from the command line or the environment) and passed down: the
    scheduler reads its profile, the pipeline its timeouts and cache bounds, the loader its
    ModelSettings, the routes the rest."""

    def __post_init__(self) -> None:
        for concern in CONCERNS:
            concern.__post_init__(self)

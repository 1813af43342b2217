"""ConfigError, and how some settings' values are read and checked."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A configuration value is wrong; the message names it."""


def check_positive(settings: object, field: str) -> None:
    if getattr(settings, field) <= 0:
        raise ConfigError(f"{field} must be positive, got {getattr(settings, field)}")


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

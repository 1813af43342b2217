"""README.md's figures that come from the code (defaults, bounds, profiles) are the code's.

Breakage caught: a default changed in the code but not in README (or the reverse), a flag added
without a line in README's table, a profile retuned without its row.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from actors.prometheus_series import LATENCY_BUCKETS, STEP_BUCKETS
from app.cli import build_parser
from app.config import PROFILES, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def flag_table() -> dict[str, str]:
    """README's flag table: flag -> its default column, a ``--a`` / ``--b`` row split in two."""
    rows: dict[str, str] = {}
    for flags, default in re.findall(r"^\| (`--[^|]+) \| ([^|]+) \|", README, flags=re.MULTILINE):
        names = re.findall(r"`(--[\w-]+)`", flags)
        defaults = [d.strip() for d in default.split(" / ")] if len(names) > 1 else [default.strip()]
        rows.update(zip(names, defaults, strict=True))
    return rows


def parser_defaults() -> dict[str, object]:
    parser = build_parser()
    return {
        option: action.default
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option not in ("--help", "--version")
    }


def test_every_flag_is_in_the_table_with_the_parsers_default() -> None:
    table, defaults = flag_table(), parser_defaults()
    assert sorted(table) == sorted(defaults), "README's flag table and the parser list the same flags"
    for flag, written in table.items():
        default = defaults[flag]
        if written == "profile's":
            assert default is None, flag  # None: the profile's value applies
        elif written == "off":
            assert default is False, flag
        elif default is None:
            assert not written.startswith("`"), f"{flag}: README gives a literal default, the parser None"
        else:
            literal = re.fullmatch(r"`([^`]+)`", written)
            assert literal, f"{flag}: README's default {written!r} is not a literal"
            assert literal.group(1) == f"{default:g}" if isinstance(default, float) else str(default), flag


def test_the_profile_table_is_the_profiles() -> None:
    for name, profile in PROFILES.items():
        match = re.search(
            rf"^\| `{name}` \| (\d+) \| (\d+) \| (\d+) tokens \| (\d+) \| (\d+) ms \| (\d+) tokens \| "
            r"(none|[\d.]+x a decode step) \|",
            README,
            re.M,
        )
        assert match, f"no row for profile {name}"
        *counts, bound = match.groups()
        assert (0.0 if bound == "none" else float(bound.split("x")[0])) == profile.mixed_step_slowdown, name
        written = tuple(int(v) for v in counts)
        assert written == (
            profile.max_batch_size,
            profile.max_queue,
            profile.prefill_chunk_tokens,
            profile.max_consecutive_prefills,
            profile.arrival_window_ms,
            profile.step_token_budget,
        ), name


@pytest.mark.parametrize(
    "pattern,value",
    [
        (r"`--stall-timeout` seconds \((\d+)\)", ServerConfig().stall_timeout),
        (r"`--drain-timeout` seconds \((\d+)\)", ServerConfig().drain_timeout),
        (r"\(`: keep-alive`\) after (\d+) s without an", ServerConfig().heartbeat_seconds),
        (r"a body over (\d+) MiB", ServerConfig().max_body_bytes / 2**20),
        (r"\((\d+) s in `hypercorn.toml`\)", tomllib.loads((ROOT / "hypercorn.toml").read_text())["graceful_timeout"]),
        (r"Latency buckets run from (\d+) ms", LATENCY_BUCKETS[0] * 1000),
        (r"Latency buckets run from \d+ ms to (\d+) s", LATENCY_BUCKETS[-1]),
        (r"inter-token and teardown from (\d+) ms", STEP_BUCKETS[0] * 1000),
        (r"inter-token and teardown from \d+ ms to (\d+) s", STEP_BUCKETS[-1]),
    ],
)
def test_the_figures_readme_states_are_the_codes(pattern: str, value: float) -> None:
    found = re.findall(pattern, README)
    assert found, f"README no longer says {pattern!r}: update this test with it"
    assert all(float(number) == value for number in found), (pattern, found, value)

"""The ``--concurrency 1,4,8`` / ``--streams 1,4,8`` argument the benchmarks share."""

from __future__ import annotations

import argparse


def parse_levels(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers (stream counts, concurrency levels), for argparse."""
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels are integers of at least 1")
    return levels

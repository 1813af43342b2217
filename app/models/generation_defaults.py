"""The sampling a request gets for the fields it leaves out, as vLLM's ``--generation-config``.

- ``auto`` (the default): the model card's recommendation (the registry's), then whatever the
  model's own ``generation_config.json`` sets on top of it (the creator's file has the last word);
- ``vllm``: neither, the neutral values (temperature 1, top_p 1, nothing cut);
- a folder: that folder's ``generation_config.json`` alone.

Only the sampling keys vLLM reads are taken: temperature, top_p, top_k, min_p,
repetition_penalty, and max_new_tokens (the default max_tokens). ``--max-tokens-default``, when
given, replaces max_new_tokens; with neither, a request that sets no limit gets
DEFAULT_MAX_TOKENS (or the rest of the context, if that is less). A value outside the range a
request may send is refused at start-up, naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.contract.sampling import SamplingDefaults

AUTO, VLLM = "auto", "vllm"
GENERATION_CONFIG = "generation_config.json"
# Long enough for a gpt-oss turn at high reasoning effort, short enough that a request that sets
# no limit cannot hold a stream for the rest of a 131,072-token context.
DEFAULT_MAX_TOKENS = 8192
FIELDS = tuple(field.name for field in dataclasses.fields(SamplingDefaults) if field.name != "source")
# The ranges a request's own fields have (app/http/schemas.py): a default is a value a client could send.
FLOAT_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (math.ulp(0.0), 1.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (0.01, 10.0),
}


class GenerationConfigError(ValueError):
    """A generation config's sampling value cannot be served; the message names it."""


def generation_config_problem(mode: str) -> str | None:
    """Why --generation-config cannot be used (a folder without the file), before anything loads."""
    if mode in (AUTO, VLLM) or (Path(mode) / GENERATION_CONFIG).is_file():
        return None
    return f"no {GENERATION_CONFIG} there (use auto, vllm or a folder that holds one)"


def from_generation_config(values: Mapping[str, Any], where: str) -> SamplingDefaults:
    """The sampling keys a generation config sets (a key set to None is not set)."""
    chosen: dict[str, Any] = {}
    for key, (low, high) in FLOAT_RANGES.items():
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise GenerationConfigError(f"{where}: {key} must be a number from {low:g} to {high:g}, got {value!r}")
        chosen[key] = float(value)
    top_k = values.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
            raise GenerationConfigError(f"{where}: top_k must be a whole number, -1 or more, got {top_k!r}")
        if top_k > 0:  # 0 and -1 cut nothing: the neutral value
            chosen["top_k"] = top_k
    max_new = values.get("max_new_tokens")
    if max_new is not None:
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise GenerationConfigError(f"{where}: max_new_tokens must be a whole number, 1 or more, got {max_new!r}")
        chosen["max_tokens"] = max_new
    return SamplingDefaults(**chosen, source=where if chosen else "neutral")


def overlay(below: SamplingDefaults, above: SamplingDefaults) -> SamplingDefaults:
    """``above``'s values where it sets them, ``below``'s elsewhere."""
    merged = {
        name: getattr(above, name) if getattr(above, name) is not None else getattr(below, name) for name in FIELDS
    }
    sources = [d.source for d in (below, above) if d.source != "neutral"]
    return SamplingDefaults(**merged, source=" + ".join(sources) or "neutral")


def sampling_defaults(
    mode: str, card: SamplingDefaults | None, file: SamplingDefaults, max_tokens_default: int | None
) -> SamplingDefaults:
    """The defaults in force. ``card``: the registry's recommendation for the model; ``file``: the
    generation config ``mode`` names (the model's own for auto, the folder's; ignored for vllm).
    ``max_tokens_default``: --max-tokens-default (None: not given; 0: the rest of the context)."""
    if mode == VLLM:
        chosen = SamplingDefaults()
    elif mode == AUTO:
        chosen = overlay(card or SamplingDefaults(), file)
    else:
        chosen = file
    if max_tokens_default is not None:
        return dataclasses.replace(chosen, max_tokens=max_tokens_default or None)
    return dataclasses.replace(chosen, max_tokens=chosen.max_tokens or DEFAULT_MAX_TOKENS)

"""``--model`` to a loadable source: an alias, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.models.local_builds import smollm2_path, tiny_gpt_oss_path

HUB_ALIASES = {
    "20b": "openai/gpt-oss-20b",
    "120b": "openai/gpt-oss-120b",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
}
# Built on this machine on first use (no hub needed), then cached.
LOCAL_BUILDS: dict[str, tuple[str, Callable[[], Path]]] = {
    "tiny-gpt-oss": ("tiny-gpt-oss", tiny_gpt_oss_path),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", smollm2_path),
}
GPT_OSS_SIZES = {"openai/gpt-oss-20b": "20b", "openai/gpt-oss-120b": "120b"}


class ModelNotFoundError(RuntimeError):
    """``--model`` names nothing that can be loaded here."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    model_id: str  # the name clients see and send back
    location: str  # what from_pretrained takes: a folder or a hub id
    aliases: tuple[str, ...]  # other names clients may use for it
    build: Callable[[], Path] | None = None  # set for models made locally on first use


def known_names() -> list[str]:
    return [*HUB_ALIASES, *LOCAL_BUILDS]


def resolve(spec: str, served_name: str | None = None) -> ModelSource:
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError("--model is empty")
    if spec in LOCAL_BUILDS:
        model_id, build = LOCAL_BUILDS[spec]
        return ModelSource(served_name or model_id, "", _names(spec, model_id), build)
    if spec in HUB_ALIASES:
        hub_id = HUB_ALIASES[spec]
        return ModelSource(served_name or hub_id, hub_id, _names(spec, hub_id))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a path but holds no config.json: not a model folder")
        return ModelSource(served_name or path.resolve().name, str(path.resolve()), (spec,))
    if spec.count("/") == 1 and not spec.startswith(("/", ".")):
        return ModelSource(served_name or spec, spec, (spec,))
    raise ModelNotFoundError(
        f"unknown model {spec!r}: not one of {', '.join(known_names())}, not a folder, not a hub id (org/name)"
    )


def _names(*names: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))

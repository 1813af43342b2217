"""``--model`` to a loadable source: an alias, a local folder, or a Hugging Face hub id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.contract.sampling import SamplingDefaults
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
# The sampling each model's card recommends, by its hub id (--generation-config auto starts from
# it; the model's generation_config.json, where it sets a key, wins). gpt-oss's cards: "We
# recommend sampling with temperature=1.0 and top_p=1.0". SmolLM2-135M-Instruct's card generates
# with temperature=0.2, top_p=0.9 (at 1.0 the 135M model wanders off: "Rouble! Marmelated ...").
GPT_OSS_CARD = SamplingDefaults(temperature=1.0, top_p=1.0, source="model card")
CARD_SAMPLING = {
    "openai/gpt-oss-20b": GPT_OSS_CARD,
    "openai/gpt-oss-120b": GPT_OSS_CARD,
    "HuggingFaceTB/SmolLM2-135M-Instruct": SamplingDefaults(temperature=0.2, top_p=0.9, source="model card"),
}


class ModelNotFoundError(RuntimeError):
    """``--model`` names nothing that can be loaded here."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    model_id: str  # the name clients see and send back
    location: str  # what from_pretrained takes: a folder or a hub id
    aliases: tuple[str, ...]  # other names clients may use for it
    build: Callable[[], Path] | None = None  # set for models made locally on first use
    card_sampling: SamplingDefaults | None = None  # what the model's card recommends (CARD_SAMPLING)


def known_names() -> list[str]:
    return [*HUB_ALIASES, *LOCAL_BUILDS]


def resolve(spec: str, served_name: str | None = None) -> ModelSource:
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError("--model is empty")
    if spec in LOCAL_BUILDS:
        model_id, build = LOCAL_BUILDS[spec]
        return ModelSource(served_name or model_id, "", _names(spec, model_id), build, CARD_SAMPLING.get(model_id))
    if spec in HUB_ALIASES:
        hub_id = HUB_ALIASES[spec]
        return ModelSource(served_name or hub_id, hub_id, _names(spec, hub_id), card_sampling=CARD_SAMPLING.get(hub_id))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a path but holds no config.json: not a model folder")
        return ModelSource(served_name or path.resolve().name, str(path.resolve()), (spec,))
    if spec.count("/") == 1 and not spec.startswith(("/", ".")):
        return ModelSource(served_name or spec, spec, (spec,), card_sampling=CARD_SAMPLING.get(spec))
    raise ModelNotFoundError(
        f"unknown model {spec!r}: not one of {', '.join(known_names())}, not a folder, not a hub id (org/name)"
    )


def _names(*names: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))

"""The sampling a request gets for what it leaves out (app/models/generation_defaults.py), and
where a request's own fields stop it (app/http/jobs.py's sampling_params). Pure: no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.contract.sampling import SamplingDefaults
from app.http.jobs import sampling_params
from app.http.schemas import SamplingFields
from app.models.generation_defaults import (
    DEFAULT_MAX_TOKENS,
    GenerationConfigError,
    from_generation_config,
    generation_config_problem,
    sampling_defaults,
)
from app.models.registry import resolve

CARD = SamplingDefaults(temperature=0.2, top_p=0.9, source="model card")


def test_auto_starts_from_the_card_and_the_models_file_wins_where_it_sets_a_key() -> None:
    file = from_generation_config({"temperature": 0.7, "top_k": 20, "do_sample": True, "top_p": None}, "g.json")
    chosen = sampling_defaults("auto", CARD, file, None)
    assert (chosen.temperature, chosen.top_p, chosen.top_k) == (0.7, 0.9, 20)
    assert chosen.source == "model card + g.json" and chosen.max_tokens == DEFAULT_MAX_TOKENS
    assert sampling_defaults("auto", CARD, SamplingDefaults(), None).temperature == 0.2


def test_vllm_is_neutral_and_a_folder_is_its_file_alone() -> None:
    file = from_generation_config({"top_p": 0.8, "max_new_tokens": 64}, "folder/generation_config.json")
    neutral = sampling_defaults("vllm", CARD, file, None)
    assert neutral == SamplingDefaults(max_tokens=DEFAULT_MAX_TOKENS)
    folder = sampling_defaults("/some/folder", CARD, file, None)
    assert (folder.temperature, folder.top_p, folder.max_tokens) == (None, 0.8, 64)


def test_max_tokens_default_replaces_max_new_tokens_and_zero_is_the_rest_of_the_context() -> None:
    file = from_generation_config({"max_new_tokens": 64}, "g.json")
    assert sampling_defaults("auto", None, file, 12).max_tokens == 12
    assert sampling_defaults("auto", None, file, 0).max_tokens is None


@pytest.mark.parametrize(
    "values", [{"temperature": -1}, {"temperature": "hot"}, {"top_p": 0}, {"top_k": 2.5}, {"max_new_tokens": 0}]
)
def test_a_value_no_request_could_send_is_refused_naming_the_key(values: dict[str, object]) -> None:
    with pytest.raises(GenerationConfigError, match=f"g.json: {next(iter(values))}"):
        from_generation_config(values, "g.json")


def test_a_folder_without_the_file_is_refused_before_anything_loads(tmp_path: Path) -> None:
    assert generation_config_problem("auto") is None and generation_config_problem("vllm") is None
    assert "no generation_config.json" in (generation_config_problem(str(tmp_path)) or "")
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.5}))
    assert generation_config_problem(str(tmp_path)) is None


def test_the_registry_carries_the_cards_recommendations() -> None:
    assert resolve("smollm2-135m").card_sampling == CARD
    for name in ("20b", "120b", "openai/gpt-oss-20b"):
        card = resolve(name).card_sampling
        assert card is not None and (card.temperature, card.top_p) == (1.0, 1.0)
    assert resolve("tiny-gpt-oss").card_sampling is None, "random weights: no card"


def test_a_requests_own_fields_always_win_and_a_default_limit_is_capped_by_the_room() -> None:
    defaults = SamplingDefaults(temperature=0.2, top_p=0.9, top_k=40, repetition_penalty=1.1, max_tokens=500)
    given = sampling_params(SamplingFields(), 100, 1000, defaults=defaults)
    assert (given.temperature, given.top_p, given.top_k, given.repetition_penalty) == (0.2, 0.9, 40, 1.1)
    assert given.max_tokens == 500
    fields = SamplingFields(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_tokens=7)
    own = sampling_params(fields, 100, 1000, defaults=defaults)
    assert (own.temperature, own.top_p, own.top_k, own.repetition_penalty, own.max_tokens) == (1.0, 1.0, 0, 1.0, 7)
    assert sampling_params(SamplingFields(), 800, 1000, defaults=defaults).max_tokens == 200, "never a 400"
    assert sampling_params(SamplingFields(), 100, 1000).max_tokens == 900, "no default: the rest of the context"

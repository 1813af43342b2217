"""Incremental detokenisation and stop strings (pure)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import pytest
from transformers import PreTrainedTokenizerFast

from app.models.harmony_tokenizer import build_harmony_tokenizer
from app.text.detokenizer import IncrementalDetokenizer
from app.text.stop_strings import StopStringMatcher


@functools.cache
def harmony_tokenizer() -> PreTrainedTokenizerFast:
    return build_harmony_tokenizer()


def decoder(tokenizer: PreTrainedTokenizerFast) -> Callable[[Sequence[int]], str]:
    return lambda ids: str(tokenizer.decode(list(ids)))


SAMPLES = [
    "plain ascii text, nothing special",
    "emoji 🙂🙃🧑‍🚀 and flags 🇫🇷",
    "日本語のテキストと中文混合",
    "naïve café — “quotes” ‘single’",
    "code:\n\tdef f(x):\n\t\treturn x ** 2\n",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_deltas_concatenate_to_the_decoded_text_and_never_break_a_character(text: str) -> None:
    tokenizer = harmony_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(decoder(tokenizer))
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_a_character_split_across_tokens_is_held_back() -> None:
    tokenizer = harmony_tokenizer()
    ids = tokenizer.encode("🧑‍🚀", add_special_tokens=False)
    decoded_alone = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in decoded_alone), "the sample must really split a character"
    detok = IncrementalDetokenizer(decoder(tokenizer))
    deltas = [detok.push(i) for i in ids]
    assert "" in deltas[:-1]
    assert "".join(deltas) + detok.flush() == "🧑‍🚀"


def test_flush_keeps_a_truly_broken_byte_as_replacement() -> None:
    tokenizer = harmony_tokenizer()
    ids = tokenizer.encode("🧑‍🚀", add_special_tokens=False)
    assert str(tokenizer.decode(ids[:1])).endswith("\ufffd")
    detok = IncrementalDetokenizer(decoder(tokenizer))
    assert detok.push(ids[0]) == ""
    assert detok.flush() == tokenizer.decode(ids[:1])


def test_stop_string_cuts_before_the_match() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("hello ").text == "hello "
    check = matcher.push("wor STOP ld")
    assert check.stopped and check.text == "wor "


def test_stop_string_split_across_pushes_is_held_then_matched() -> None:
    matcher = StopStringMatcher(["</end>"])
    first = matcher.push("answer </e")
    assert first.text == "answer " and not first.stopped
    second = matcher.push("nd> trailing")
    assert second.stopped and second.text == ""


def test_held_text_is_released_when_it_stops_matching() -> None:
    matcher = StopStringMatcher(["</end>"])
    assert matcher.push("a </").text == "a "
    assert matcher.push("b>").text == "</b>"
    assert matcher.push("x <").text == "x "
    assert matcher.flush() == "<"


def test_earliest_of_several_stop_strings_wins() -> None:
    matcher = StopStringMatcher(["zz", "b"])
    check = matcher.push("abczz")
    assert check.stopped and check.text == "a"


def test_no_stop_strings_passes_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("anything").text == "anything"
    assert matcher.flush() == ""

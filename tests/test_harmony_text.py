"""Harmony channels from gpt-oss output tokens, as they arrive."""

from __future__ import annotations

import random
from collections.abc import Sequence

from app.prompts.harmony_encoding import harmony_encoding
from app.text.harmony_text import HarmonyTokenText

RETURN = 200002


def decode(ids: Sequence[int]) -> str:
    return str(harmony_encoding().decode(list(ids)))


def run(tokens: list[int], stop: int | None = RETURN) -> list[tuple[str, str | None]]:
    text = HarmonyTokenText(decode)
    pieces = [text.push(t, t == stop) for t in tokens]
    tail = text.flush()
    pieces.append(tail)
    return [(p.text, p.channel) for p in pieces]


def joined(pieces: list[tuple[str, str | None]], channel: str | None) -> str:
    return "".join(text for text, ch in pieces if ch == channel)


def test_analysis_is_reasoning_and_final_is_the_answer() -> None:
    output = (
        "<|channel|>analysis<|message|>The user wants 2+2 🧑‍🚀.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 4 🙂.<|return|>"
    )
    pieces = run(harmony_encoding().encode(output, allowed_special="all"))
    assert joined(pieces, "analysis") == "The user wants 2+2 🧑‍🚀."
    assert joined(pieces, "final") == "It is 4 🙂."
    assert joined(pieces, None) == ""
    assert all("\ufffd" not in text for text, _ in pieces)


def test_output_that_is_not_harmony_is_shown_as_plain_text() -> None:
    rng = random.Random(3)
    tokens = [rng.randrange(1000, 190_000) for _ in range(100)]
    pieces = run(tokens, stop=None)
    assert "".join(text for text, _ in pieces) == decode(tokens)
    assert {channel for _, channel in pieces} == {None}


def test_short_garbage_is_shown_when_the_output_ends() -> None:
    tokens = harmony_encoding().encode("not a harmony message at all", allowed_special="all")
    pieces = run([*tokens, RETURN])
    assert "".join(text for text, _ in pieces) == "not a harmony message at all"


def test_after_a_real_message_broken_output_is_not_shown_twice() -> None:
    good = harmony_encoding().encode("<|channel|>final<|message|>Fine.<|end|>", allowed_special="all")
    junk = harmony_encoding().encode(" x" * 60, allowed_special="all")
    pieces = run(good + junk, stop=None)
    assert joined(pieces, "final") == "Fine."
    assert joined(pieces, None).count("Fine.") == 0 and joined(pieces, None).endswith(" x x")

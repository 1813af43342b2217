"""Logprobs on their way out: batch policy -> scheduler event -> relay (spelled, settled on the
tokens that are text) -> stream token, and the prompt cache's replays. No model, no server."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import trio

from actors.messages import (
    SchedulerEvent,
    StreamDone,
    StreamEvent,
    StreamStarted,
    StreamToken,
    Timings,
    TokenOut,
    Usage,
)
from actors.prompt_cache import CachedResponse
from actors.relay import TokenRelay
from app.batching.batch import Batch
from app.contract.step import RowOutput, StepResult, TokenLogprobs
from app.prompts.harmony_encoding import harmony_encoding
from app.text.harmony_text import HarmonyTokenText
from app.text.logprobs import LogprobSpeller, ShownLogprob, ShownLogprobs, spell
from app.text.pieces import TextPiece
from app.text.plain_text import PlainTokenText
from tests.test_batch_policy import PROFILE, request
from tests.test_prompt_cache import ScriptedGeneration, drain, make_cache, open_and_read
from tests.test_relay_actor import LetterText, make_relay, run_relay, script

RETURN = 200002


def harmony_decode(ids: Sequence[int]) -> str:
    return str(harmony_encoding().decode(list(ids)))


def harmony_bytes(token_id: int) -> bytes:
    return harmony_decode([token_id]).encode()  # right for the whole-character tokens used here


# -- which tokens are text ---------------------------------------------------------------------------
def test_plain_text_settles_every_token_but_stop_tokens_even_half_a_character() -> None:
    tokens = harmony_encoding().encode("ok 🎉🧑‍🚀!", allowed_special="all")
    text = PlainTokenText(harmony_decode)
    pieces = [text.push(t, False) for t in tokens] + [text.push(RETURN, True)]
    assert any(p.text == "" for p in pieces[:-1]), "the emoji must be split, or this proves little"
    assert [p.shown for p in pieces] == [(i,) for i in range(len(tokens))] + [()]


def test_harmony_settles_the_message_tokens_only_each_on_its_channel() -> None:
    encoding = harmony_encoding()
    analysis = encoding.encode("Think 🧠.", allowed_special="all")
    final = encoding.encode("It is 4.", allowed_special="all")
    opening = encoding.encode("<|channel|>analysis<|message|>", allowed_special="all")
    middle = encoding.encode("<|end|><|start|>assistant<|channel|>final<|message|>", allowed_special="all")
    output = [*opening, *analysis, *middle, *final, RETURN]
    text = HarmonyTokenText(harmony_decode)
    pieces = [text.push(t, t == RETURN) for t in output]
    shown = {position: piece.channel for piece in pieces for position in piece.shown}
    first_final = len(opening) + len(analysis) + len(middle)
    assert shown == {
        **{len(opening) + i: "analysis" for i in range(len(analysis))},
        **{first_final + i: "final" for i in range(len(final))},
    }, "structure (<|channel|>, the channel names, <|message|>, <|end|>, <|return|>) is not text"


def test_output_that_is_not_harmony_settles_its_held_headers_once_it_falls_back() -> None:
    """A header that runs on becomes plain text: the tokens held in it are text after all."""
    tokens = harmony_encoding().encode(" word" * 60, allowed_special="all")
    text = HarmonyTokenText(harmony_decode)
    pieces = [text.push(t, False) for t in tokens]
    positions = [position for piece in pieces for position in piece.shown]
    assert positions == list(range(len(tokens)))
    assert len(pieces[next(i for i, p in enumerate(pieces) if p.shown)].shown) > 1, "the fallback settles many"


def test_short_garbage_is_settled_at_the_flush_without_its_stop_token() -> None:
    tokens = harmony_encoding().encode("no harmony", allowed_special="all")
    text = HarmonyTokenText(harmony_decode)
    pieces = [text.push(t, False) for t in tokens] + [text.push(RETURN, True)]
    assert all(p.shown == () for p in pieces)
    assert text.flush().shown == tuple(range(len(tokens)))


# -- spelling ----------------------------------------------------------------------------------------------
def test_tokens_are_spelled_as_text_or_as_openai_spells_broken_utf8() -> None:
    assert spell("é".encode()) == "é"
    assert spell(b"\xf0\x9f") == "bytes:\\xf0\\x9f"
    speller = LogprobSpeller(harmony_bytes)
    shown = speller.show(RETURN, TokenLogprobs(-0.5, ((RETURN, -0.5), (12194, -math.inf))))
    assert shown.chosen == ShownLogprob("<|return|>", b"<|return|>", -0.5)
    assert shown.top[1] == ShownLogprob("Hi", b"Hi", -9999.0), "JSON has no -Infinity: OpenAI's floor"


# -- the batch policy and the relay --------------------------------------------------------------------------
def test_the_batch_hands_each_token_its_logprobs() -> None:
    batch: Batch[str] = Batch(PROFILE, 4096)
    batch.offer(request("a"))
    batch.offer(request("b"))
    work = batch.take_work()
    assert work.plan is not None
    entry = TokenLogprobs(-0.25, ((7, -0.25),))
    result = StepResult({"a": RowOutput(4, (7,), (entry,)), "b": RowOutput(4, (8,))}, "prefill", 2, 8, 0.01)
    deliveries = {d.request.request_id: d for d in batch.apply_step(work.plan, result, 1.0).deliveries}
    assert deliveries["a"].logprobs is entry and deliveries["b"].logprobs is None


class SettlingLetters(LetterText):
    """LetterText that says which tokens are text, as the real converters do."""

    def __init__(self) -> None:
        self._pushed = 0

    def push(self, token_id: int, is_stop_token: bool) -> TextPiece:
        position, self._pushed = self._pushed, self._pushed + 1
        piece = super().push(token_id, is_stop_token)
        return dataclasses.replace(piece, shown=() if is_stop_token else (position,))


def with_logprobs(events: list[SchedulerEvent]) -> list[SchedulerEvent]:
    """Each token of a script, with a logprob that names it and one alternative."""
    return [
        dataclasses.replace(e, logprobs=TokenLogprobs(-float(e.index), ((e.token_id + 1, -0.1),)))
        if isinstance(e, TokenOut)
        else e
        for e in events
    ]


async def test_the_relay_spells_logprobs_and_a_held_back_token_keeps_its_entry() -> None:
    """A possible stop string's start is held back ("" text) but its entry comes with it, once."""
    relay, to_relay, from_relay, _ = make_relay(stop=("abc",), text=SettlingLetters())
    out = await run_relay(relay, to_relay, with_logprobs(script("xxab")), from_relay)
    tokens = [e for e in out if isinstance(e, StreamToken)]
    assert [t.text for t in tokens] == ["x", "x", "", "ab"]
    for index, (token, letter) in enumerate(zip(tokens, "xxab", strict=True)):
        expected = ShownLogprobs(
            ShownLogprob(letter, letter.encode(), -float(index)),
            (ShownLogprob(chr(ord(letter) + 1), chr(ord(letter) + 1).encode(), -0.1),),
        )
        assert token.logprobs == expected
        assert token.text_logprobs == (expected,)
        assert token.text_logprobs[0] is token.logprobs, "one object, not two copies"


async def test_without_logprobs_a_token_carries_none() -> None:
    relay, to_relay, from_relay, _ = make_relay(text=SettlingLetters())
    out = await run_relay(relay, to_relay, script("hey"), from_relay)
    assert all(e.logprobs is None and e.text_logprobs == () for e in out if isinstance(e, StreamToken))


async def test_structure_tokens_have_their_own_logprob_but_no_text_entry() -> None:
    """Harmony: every token event shows its own logprob (the native API lists them all), but only
    message text is settled, so only it is listed in OpenAI's shapes."""
    encoding = harmony_encoding()
    output = encoding.encode("<|channel|>final<|message|>Hi there<|return|>", allowed_special="all")
    to_relay, relay_in = trio.open_memory_channel[SchedulerEvent](100)
    relay_out, from_relay = trio.open_memory_channel[StreamEvent](2)
    text = HarmonyTokenText(harmony_decode)
    relay = TokenRelay("r1", 0.0, 3, relay_in, relay_out, text, (), lambda rid, why: None, token_bytes=harmony_bytes)
    events = script("x" * len(output))
    events = [
        dataclasses.replace(e, token_id=output[e.index], is_stop_token=output[e.index] == RETURN)
        if isinstance(e, TokenOut)
        else e
        for e in events
    ]
    out = await run_relay(relay, to_relay, with_logprobs(events), from_relay)
    tokens = [e for e in out if isinstance(e, StreamToken)]
    assert all(t.logprobs is not None for t in tokens)
    settled = [entry.chosen.token for t in tokens for entry in t.text_logprobs]
    assert "".join(settled) == "Hi there" and len(settled) == 2
    assert all(t.channel == "final" for t in tokens if t.text_logprobs)


# -- the prompt cache ---------------------------------------------------------------------------------------
def shown(token: str, logprob: float) -> ShownLogprobs:
    alternatives = tuple(ShownLogprob(f"{token}{i}", f"{token}{i}".encode(), logprob - i) for i in range(5))
    return ShownLogprobs(ShownLogprob(token, token.encode(), logprob), alternatives)


async def test_a_replay_carries_the_same_logprobs() -> None:
    cache, _ = make_cache()
    generation = ScriptedGeneration(["Hel", "lo"])
    tokens = [
        StreamToken(text, 100 + i, i, None, shown(text, -i), (shown(text, -i),)) for i, text in enumerate(["Hel", "lo"])
    ]
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        first, _ = await open_and_read(cache, generation, "r1")
        await trio.sleep(0.01)
        assert generation.out is not None
        for token in tokens:
            generation.out.send_nowait(token)
        generation.finish_now()
        await drain(first)
        second, _ = await open_and_read(cache, generation, "r2")
        replayed: list[StreamEvent] = await drain(second)
        cache.close()
    assert isinstance(replayed[0], StreamStarted) and replayed[0].cache == "HIT"
    again = [e for e in replayed if isinstance(e, StreamToken)]
    assert [(t.logprobs, t.text_logprobs) for t in again] == [(t.logprobs, t.text_logprobs) for t in tokens]


def test_the_cache_counts_the_bytes_logprobs_hold() -> None:
    done = StreamDone("r", "stop", Usage(1, 2), Timings(0.0, None, None, 1.0))
    bare = [StreamToken(text, i, i) for i, text in enumerate(["Hel", "lo"])]
    rich = [dataclasses.replace(t, logprobs=shown(t.text, -1.0), text_logprobs=(shown(t.text, -1.0),)) for t in bare]
    assert CachedResponse(tuple(rich), done).size() > CachedResponse(tuple(bare), done).size() + 2 * 5 * 100

"""Logprobs as a client sees them: each token id spelled as its text and its bytes.

The runner gives token ids and raw logprobs (app.contract.step.TokenLogprobs); clients get
OpenAI's fields: ``token`` (text), ``bytes`` (UTF-8 bytes, the truth when a token holds only part
of a character) and ``logprob``. A token whose bytes are not whole UTF-8 is spelled as OpenAI does,
``bytes:\\xe4\\xb8``, so that no text field ever carries a broken character or U+FFFD.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.contract.step import TokenLogprobs

# OpenAI's value for "very unlikely"; JSON has no -Infinity (a model may give a token -inf).
LOWEST_LOGPROB = -9999.0


@dataclass(frozen=True, slots=True)
class ShownLogprob:
    token: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class ShownLogprobs:
    """One generated token's logprob and its likeliest alternatives (likeliest first)."""

    chosen: ShownLogprob
    top: tuple[ShownLogprob, ...]


def spell(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def shown_value(logprob: float) -> float:
    return logprob if logprob >= LOWEST_LOGPROB else LOWEST_LOGPROB  # NaN and -inf too


class LogprobSpeller:
    """Spells one request's logprobs with the served model's ``token_bytes``."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes

    def one(self, token_id: int, logprob: float) -> ShownLogprob:
        data = self._token_bytes(token_id)
        return ShownLogprob(spell(data), data, shown_value(logprob))

    def show(self, token_id: int, logprobs: TokenLogprobs) -> ShownLogprobs:
        return ShownLogprobs(
            self.one(token_id, logprobs.logprob), tuple(self.one(other, value) for other, value in logprobs.top)
        )

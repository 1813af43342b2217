"""Which token -> text conversion a request gets: Harmony channels for gpt-oss conversations, plain
detokenisation for everything else."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from app.text.harmony_text import HarmonyTokenText
from app.text.pieces import TextMode, TokenText
from app.text.plain_text import PlainTokenText


def token_text(mode: TextMode, decode: Callable[[Sequence[int]], str]) -> TokenText:
    """A fresh converter for one request's output."""
    if mode == "harmony":
        return HarmonyTokenText(decode)
    return PlainTokenText(decode)

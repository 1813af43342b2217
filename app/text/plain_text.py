"""Plain detokenised output, for models that do not speak Harmony (see app.text.pieces.TokenText)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from app.text.detokenizer import IncrementalDetokenizer
from app.text.pieces import TextPiece


class PlainTokenText:
    """Detokenised text; end-of-sequence tokens are counted but show no text."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._detokenizer = IncrementalDetokenizer(decode)
        self._pushed = 0

    def push(self, token_id: int, is_stop_token: bool) -> TextPiece:
        position = self._pushed
        self._pushed += 1
        if is_stop_token:
            return TextPiece("")
        return TextPiece(self._detokenizer.push(token_id), shown=(position,))

    def flush(self) -> TextPiece:
        return TextPiece(self._detokenizer.flush())

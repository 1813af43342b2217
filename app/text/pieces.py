"""What turning token ids into text gives the relay: pieces of text, each on a Harmony channel or none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

# plain: detokenised text. harmony: the prompt is a Harmony conversation, the output has channels.
TextMode = Literal["plain", "harmony"]


@dataclass(frozen=True, slots=True)
class TextPiece:
    text: str
    channel: str | None = None


class TokenText(Protocol):
    """Per-request token -> text conversion (plain detokenisation, or Harmony channels)."""

    def push(self, token_id: int, is_stop_token: bool) -> TextPiece: ...

    def flush(self) -> TextPiece: ...

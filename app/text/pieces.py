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
    # The output positions (0-based) of the tokens this piece settles as shown text: its own token
    # (even while its text is held back, half a character), earlier ones that turn out to be text
    # (Harmony headers of an output that is not Harmony), none for structure and stop tokens.
    # Logprobs are listed for these tokens only, and each settled token once.
    shown: tuple[int, ...] = ()
    # Harmony: whom the message is to ("functions.get_weather" for a tool call; None: the user),
    # and which message of the output it is (0, 1, ...), so that two calls in a row stay apart.
    recipient: str | None = None
    message: int = 0


class TokenText(Protocol):
    """Per-request token -> text conversion (plain detokenisation, or Harmony channels)."""

    def push(self, token_id: int, is_stop_token: bool) -> TextPiece: ...

    def flush(self) -> TextPiece: ...

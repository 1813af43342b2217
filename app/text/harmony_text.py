"""gpt-oss output as Harmony messages: the channel each piece of text belongs to, as tokens arrive.

openai-harmony's StreamableParser does the parsing (and holds back split characters). Structure
tokens (``<|channel|>``, ``analysis``, ``<|message|>``...) show no text. A model that does not
follow the format (a broken fine-tune, or the random-weight tiny gpt-oss) would otherwise show
nothing at all: when the parser fails, or a header runs on past any real one, the rest of the
output is passed through as plain text, from its first token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import openai_harmony as oh

from app.prompts.harmony_encoding import harmony_encoding
from app.text.detokenizer import IncrementalDetokenizer
from app.text.pieces import TextPiece

# A real header (<|start|>assistant<|channel|>commentary to=functions.x <|constrain|>json<|message|>)
# is well under this many tokens.
MAX_HEADER_TOKENS = 48


class HarmonyTokenText:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._parser = oh.StreamableParser(harmony_encoding(), role=oh.Role.ASSISTANT)
        self._decode = decode
        self._tokens: list[int] = []
        self._header_tokens = 0
        self._shown = 0  # tokens before this index were parsed as message content (already shown)
        self._plain: IncrementalDetokenizer | None = None  # set once the output is not Harmony
        self._last_was_stop = False
        self._message = -1  # the output's Harmony messages opened so far, less one

    def push(self, token_id: int, is_stop_token: bool) -> TextPiece:
        self._tokens.append(token_id)
        position = len(self._tokens) - 1
        self._last_was_stop = is_stop_token
        if self._plain is not None:
            if is_stop_token:
                return TextPiece("")
            return TextPiece(self._plain.push(token_id), shown=(position,))
        in_message = self._parser.state == oh.StreamState.CONTENT
        try:
            self._parser.process(token_id)
        except oh.HarmonyError:
            return self._fall_back(is_stop_token)
        if self._parser.state == oh.StreamState.CONTENT:
            self._header_tokens = 0
            self._shown = len(self._tokens)
            delta = self._parser.last_content_delta or ""
            if not in_message:
                self._message += 1
            # <|message|> opens the content (structure); the tokens after it are the message's text.
            # Its piece names the recipient already: a tool call is known before its arguments.
            shown = (position,) if in_message else ()
            channel, recipient = self._parser.current_channel, self._parser.current_recipient
            return TextPiece(delta, channel, shown, recipient, self._message)
        self._header_tokens += 1
        if self._header_tokens > MAX_HEADER_TOKENS:
            return self._fall_back(is_stop_token)
        return TextPiece("")

    def flush(self) -> TextPiece:
        if self._plain is None and self._shown == 0 and self._tokens:
            # The output ended before it ever formed a Harmony message: show it as it is.
            piece = self._fall_back(self._last_was_stop)
            return TextPiece(piece.text + self._plain_flush(), shown=piece.shown)
        return TextPiece(self._plain_flush())

    def _plain_flush(self) -> str:
        return self._plain.flush() if self._plain is not None else ""

    def _fall_back(self, is_stop_token: bool) -> TextPiece:
        self._plain = IncrementalDetokenizer(self._decode)
        # Everything not shown yet (headers included) becomes text: nothing the model said is hidden.
        end = len(self._tokens) - 1 if is_stop_token else len(self._tokens)
        text = "".join(self._plain.push(token) for token in self._tokens[self._shown : end])
        return TextPiece(text, shown=tuple(range(self._shown, end)))

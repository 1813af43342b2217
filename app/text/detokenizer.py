"""Incremental detokenisation: text deltas whose concatenation is exactly the decoded text.

A token can end in the middle of a multi-byte character (byte-level BPE splits emoji and CJK
across tokens); its text is held back until the character is complete, never sent broken.
Tokenizers that look at neighbours (sentencepiece's leading spaces) are handled by decoding a
short window of earlier tokens and emitting only the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        # Tokens [prefix_offset, read_offset) were emitted last time and are decoded again as
        # context; tokens from read_offset on are not emitted yet.
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """The new text that this token completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def flush(self) -> str:
        """Whatever is still held back, as it decodes (a truly broken byte stays a U+FFFD)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :]

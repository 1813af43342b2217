"""The bytes a single token stands for: what logprobs show a client (OpenAI's ``bytes`` field).

Decoding one token alone loses information: a byte-level BPE token can hold part of a UTF-8
character (an emoji is often split over two or three tokens), and ``tokenizer.decode`` of such a
token gives U+FFFD. Byte-level vocabularies (GPT-2's, SmolLM2's, o200k's) spell every byte as one
printable character (GPT-2's ``bytes_to_unicode``); inverting that table gives the exact bytes.
Added tokens (specials such as ``<|im_end|>`` or ``<|return|>``) are their literal text.
"""

from __future__ import annotations

from typing import Any


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: the printable bytes stand for themselves, the others for the code points
    from 256 up, in byte order (so that no BPE token ever holds a space or a control character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}


class TokenBytes:
    """token id -> its bytes, for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._literal = {int(token_id): str(getattr(token, "content", token)) for token_id, token in added.items()}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"

    def __call__(self, token_id: int) -> bytes:
        literal = self._literal.get(token_id)
        if literal is not None:
            return literal.encode("utf-8")
        if self._byte_level:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if piece is None:  # past the tokenizer's vocabulary (a model's padded logits)
                return b""
            try:
                return bytes(BYTE_OF_CHAR[char] for char in piece)
            except KeyError:
                pass  # not a byte-level spelling after all: the decoder says what it is
        # Other vocabularies (sentencepiece): what the token decodes to alone, the best there is.
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False)).encode("utf-8")

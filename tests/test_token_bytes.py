"""token_bytes: the exact bytes of one token, for the byte-level tokenizers served here."""

from __future__ import annotations

import pytest

from app.engine.loader import ModelWeights
from app.models.token_bytes import TokenBytes, bytes_to_unicode

# Accents, CJK, an emoji that byte-level BPE splits, a ZWJ sequence, a rare letter.
MULTI_BYTE = "héllo 世界 🎉🧑‍🚀 ok ŵ — «fin»"


def test_gpt2s_table_spells_every_byte_once() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


@pytest.mark.parametrize("name", ["smollm2", "tiny-gpt-oss"])
def test_the_bytes_of_a_texts_tokens_join_to_its_utf8(
    name: str, smollm2_weights: ModelWeights, tiny_weights: ModelWeights
) -> None:
    """Breakage caught: bytes from decoding one token alone (U+FFFD for a split character)."""
    tokenizer = (smollm2_weights if name == "smollm2" else tiny_weights).tokenizer
    spell = TokenBytes(tokenizer)
    ids = tokenizer.encode(MULTI_BYTE, add_special_tokens=False)
    pieces = [spell(token_id) for token_id in ids]
    assert b"".join(pieces) == MULTI_BYTE.encode("utf-8")
    split = [piece for piece in pieces if not is_utf8(piece)]
    assert split, "the text must split a character across tokens, or this test proves little"
    # Every token of the vocabulary that stands for whole characters is what decode says it is.
    for token_id in range(len(tokenizer)):
        alone = str(tokenizer.decode([token_id]))
        if "\ufffd" not in alone:
            assert spell(token_id) == alone.encode("utf-8"), token_id


@pytest.mark.parametrize(("name", "special"), [("smollm2", "<|im_end|>"), ("tiny-gpt-oss", "<|return|>")])
def test_special_tokens_are_their_literal_text(
    name: str, special: str, smollm2_weights: ModelWeights, tiny_weights: ModelWeights
) -> None:
    tokenizer = (smollm2_weights if name == "smollm2" else tiny_weights).tokenizer
    token_id = tokenizer.get_vocab()[special]
    assert TokenBytes(tokenizer)(token_id) == special.encode("ascii")


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True

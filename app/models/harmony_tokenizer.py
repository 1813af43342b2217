"""The o200k_harmony tokenizer (gpt-oss's) built offline as a transformers fast tokenizer.

No hub is reachable here, so the BPE ranks ship with the package (``app/data``) and the
Harmony special tokens come from openai-harmony itself, which knows their ids.
"""

from __future__ import annotations

import base64
from pathlib import Path

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from app.prompts.harmony_encoding import TIKTOKEN_FILE, TokenizerDataError, harmony_encoding, tiktoken_data_dir

# o200k_base's pre-tokenisation pattern, as tiktoken defines it.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def harmony_special_tokens(vocab_size: int) -> list[tuple[int, str]]:
    """(id, text) of every Harmony special token that fits the model's vocabulary, by id."""
    encoding = harmony_encoding()
    specials = []
    for text in encoding.special_tokens_set:
        (token_id,) = encoding.encode(text, allowed_special="all")
        if token_id < vocab_size:
            specials.append((token_id, text))
    return sorted(specials)


class _PackagedTikTokenConverter(TikTokenConverter):
    """TikTokenConverter that reads the ranks itself instead of importing tiktoken."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        return read_tiktoken_ranks(Path(tiktoken_url))


def build_harmony_tokenizer(vocab_size: int = 201088) -> PreTrainedTokenizerFast:
    ranks_path = tiktoken_data_dir() / TIKTOKEN_FILE
    backend = _PackagedTikTokenConverter(str(ranks_path), pattern=O200K_PATTERN).converted()
    specials = harmony_special_tokens(vocab_size)
    # Added one by one in id order: the converter's own extra_special_tokens renumbers them.
    for expected_id, text in specials:
        backend.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        actual = backend.token_to_id(text)
        if actual != expected_id:
            raise TokenizerDataError(f"special token {text} got id {actual}, expected {expected_id}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )

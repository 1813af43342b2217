"""openai-harmony's gpt-oss encoding, loaded offline from the packaged o200k_base ranks."""

from __future__ import annotations

import functools
import os

from openai_harmony import HarmonyEncoding, HarmonyEncodingName, load_harmony_encoding


@functools.cache
def harmony_encoding() -> HarmonyEncoding:
    from app.models.harmony_tokenizer import tiktoken_data_dir

    # openai-harmony reads the ranks from this folder instead of downloading them.
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(tiktoken_data_dir())
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)

"""openai-harmony's gpt-oss encoding, loaded offline from the packaged o200k_base ranks.

No hub is reachable here, so the BPE ranks ship with the package (``app/data``), checked against
their sha256. The transformers tokenizer built from the same ranks is app.models.harmony_tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from openai_harmony import HarmonyEncoding, HarmonyEncodingName, load_harmony_encoding

TIKTOKEN_FILE = "o200k_base.tiktoken"
TIKTOKEN_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
PACKAGED_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class TokenizerDataError(RuntimeError):
    """The tiktoken ranks are missing or not the file gpt-oss was trained with."""


def tiktoken_data_dir() -> Path:
    """The folder holding o200k_base.tiktoken, checked against its sha256."""
    override = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    folder = Path(override) if override else PACKAGED_DATA_DIR
    path = folder / TIKTOKEN_FILE
    if not path.is_file():
        raise TokenizerDataError(f"{path} not found: the o200k_base ranks are needed offline")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != TIKTOKEN_SHA256:
        raise TokenizerDataError(f"{path} has sha256 {digest}, expected {TIKTOKEN_SHA256}")
    return folder


@functools.cache
def harmony_encoding() -> HarmonyEncoding:
    # openai-harmony reads the ranks from this folder instead of downloading them.
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(tiktoken_data_dir())
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)

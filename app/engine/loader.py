"""Load a model and its tokenizer, and wrap them in a runner ready to serve.

The runner is chosen here, once: ``ModelRunner`` (the dynamic row cache) by default,
``StaticModelRunner`` (preallocated slots, fixed-shape decode steps, CUDA graphs on a GPU) with
``cuda_graphs``. Both have the same interface; the scheduler does not know which it drives.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.distributed import DistributedConfig
from transformers.utils import logging as hf_logging

from app.config import ModelSettings
from app.contract.failures import first_line
from app.contract.model import CallSyntax, MemoryPool
from app.contract.sampling import SamplingDefaults, SamplingParams
from app.contract.step import PrefillChunk
from app.engine import moe_loading, shards, tensor_parallel
from app.engine.cuda_graphs import Capture, StepGraphs
from app.engine.grammar import DEFAULT_COMPILE_TIMEOUT, GrammarCompiler, HarmonyMarkers
from app.engine.memory_pools import PoolReservationError
from app.engine.runner import BaseRunner, ModelRunner
from app.engine.slot_cache import SlotKVCache, SlotShape
from app.engine.static_runner import StaticModelRunner
from app.models import generation_defaults
from app.models.registry import GPT_OSS_SIZES, ModelSource
from app.models.token_bytes import TokenBytes
from app.text.template_calls import syntax_for

log = structlog.get_logger("engine.loader")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# With --cuda-graphs every slot holds this many positions from start-up, unless --max-seq-len says.
STATIC_DEFAULT_SEQ_LEN = 4096
# The dynamic path's KV cache, reserved at start-up: every row, this many positions each (the
# model's context when shorter). A longer sequence grows it, once, up to the context.
KV_RESERVED_POSITIONS = 1024
# Decode graphs captured at start-up: every batch bucket, kv buckets up to this many positions
# (longer ones are captured on first use).
PRECAPTURE_POSITIONS = 1024


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
    runner: BaseRunner
    stop_token_ids: frozenset[int]
    parameters: int
    vocab_size: int = 0  # the logits' width
    grammars: GrammarCompiler | None = None  # structured outputs (xgrammar), over this tokenizer
    decode_path: str = "dynamic"  # "dynamic", "static" (eager) or "static+cuda_graphs"
    memory_pools: tuple[MemoryPool, ...] = ()  # what the runner reserved at start-up
    max_token_bytes: int = 4096  # no token is longer: a prompt's size bounds its length in tokens
    tool_call_syntax: CallSyntax | None = None  # how its chat template writes tool calls (None: unread)
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)  # for the fields a request leaves out
    _token_bytes: TokenBytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_token_bytes", TokenBytes(self.tokenizer))  # frozen: set once, here

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=False))

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes(token_id)


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


def longest_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most bytes one token stands for. In a byte-level vocabulary (GPT-2's, o200k's) each
    character of a token is one byte; otherwise a character may be up to four."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    return longest if byte_level else 4 * longest


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


def load_weights(
    source: ModelSource, *, dtype: str, device: str, tensor_parallel_size: int = 1, expert_parallel: bool = False
) -> ModelWeights:
    """``tensor_parallel_size`` > 1: this process is one of the ranks torchrun started; it joins
    the group and loads its shard of the model (transformers' own plan for it), with
    ``expert_parallel`` also 1/N of the experts (the model's expert-parallel plan)."""
    try:
        location = str(source.build()) if source.build is not None else source.location
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(
            f"cannot load model {source.model_id!r} from {source.location or 'its local build'}: {first_line(error)}"
        ) from error
    if expert_parallel:
        try:  # before joining: every rank refuses on its own, at once
            tensor_parallel.check_expert_parallel(config, tensor_parallel_size)
        except shards.TensorParallelError as error:
            raise ModelLoadError(str(error)) from error
    torch_device = pick_device(device) if tensor_parallel_size == 1 else _rank_device(device, tensor_parallel_size)
    torch_dtype = pick_dtype(dtype, torch_device)
    hf_logging.disable_progress_bar()
    try:
        model = _from_pretrained(location, config, torch_dtype, torch_device, tensor_parallel_size, expert_parallel)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load model {source.model_id!r}: {first_line(error)}") from error
    model.eval()
    if tensor_parallel_size > 1:
        held = tensor_parallel.shard_bytes(model)
        log.info(
            "tensor_parallel_shard",
            rank=tensor_parallel.join(tensor_parallel_size).rank,
            expert_parallel=expert_parallel,
            parameter_bytes=held.parameters,
            expert_bytes=held.experts,
        )
    experts = moe_loading.experts_in_use(model)
    if experts is not None:
        log.info("experts", implementation=experts, device=str(torch_device), dtype=str(torch_dtype))
        if torch_device.type == "cuda" and experts == "eager":
            log.warning("experts_eager", detail="grouped_mm was not available: decode runs at about half speed")
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


def _rank_device(requested: str, size: int) -> torch.device:
    """A rank's device: its own GPU, or the CPU on a machine with none (transformers places the
    shards so; an explicit --device must agree)."""
    try:
        device = tensor_parallel.join(size).device
    except shards.TensorParallelError as error:
        raise ModelLoadError(str(error)) from error
    if requested not in ("auto", device.type, str(device)):
        raise ModelLoadError(
            f"--device {requested}: with --tensor-parallel-size each rank runs on {device.type} "
            "(its own GPU, LOCAL_RANK, or the CPU when there is none)"
        )
    return device


def _from_pretrained(
    location: str,
    config: object,
    dtype: torch.dtype,
    device: torch.device,
    tensor_parallel_size: int = 1,
    expert_parallel: bool = False,
) -> PreTrainedModel:
    options = moe_loading.load_options(config, device)
    placement: dict[str, object] = {"device_map": device}
    if tensor_parallel_size > 1:
        # Sharded by the model's own plan; transformers places each rank's shard (no device_map).
        # ep_size = tp_size: the experts over the same ranks, which all hold the same batch (so
        # transformers sums the experts' outputs with an all-reduce). The tensor-parallel plan
        # stays: with tp_plan={} (the expert plan alone) 5.24 refuses tp_size > 1 for gpt-oss.
        ep_size = tensor_parallel_size if expert_parallel else None
        placement = {
            "distributed_config": DistributedConfig(tp_plan="auto", tp_size=tensor_parallel_size, ep_size=ep_size)
        }
    try:
        return AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **placement, **options)
    except Exception as error:
        if "quantization_config" in options or moe_loading.quantization_method(config) != "mxfp4":
            raise
        # The MXFP4 kernels could not be had (most often: not in the local hub cache, offline).
        reason = f"MXFP4 load failed: {first_line(error)}"
        options = moe_loading.load_options(config, device, mxfp4_reason=reason)
        return AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **placement, **options)


def serve_weights(
    weights: ModelWeights,
    settings: ModelSettings,
    *,
    max_batch_size: int,
    precapture_positions: int = PRECAPTURE_POSITIONS,
    capture: Capture | None = None,
) -> LoadedModel:
    """A fresh runner (and KV cache) over loaded weights, warmed up, as ``settings`` say.

    ``cuda_graphs``: the static path (slot cache allocated now, fixed-shape decode steps, captured
    as CUDA graphs on a GPU, eager elsewhere). ``max_seq_len`` caps prompt + generated tokens per
    sequence (the static path's default is STATIC_DEFAULT_SEQ_LEN: every slot holds that many).
    ``chat_template``'s file replaces the tokenizer's template. ``capture``: what captures the
    static path's decode steps instead of CUDA graphs, on any device (the GPU check's CPU run
    serves through a stand-in, so its replays are what it measures). The load settings (dtype,
    device, tensor_parallel_size, expert_parallel) were load_weights'.
    """
    chat_template = read_chat_template(settings.chat_template)
    defaults = default_sampling(weights, settings.generation_config, settings.max_tokens_default)
    max_context = weights.max_context
    if settings.max_seq_len is not None:
        max_context = min(max_context, settings.max_seq_len)
    elif settings.cuda_graphs:
        max_context = min(max_context, STATIC_DEFAULT_SEQ_LEN)
    runner: BaseRunner
    try:
        if settings.cuda_graphs:
            runner = _static_runner(weights, max_batch_size, max_context, capture, settings.prefix_cache_bytes)
        else:
            runner = ModelRunner(
                weights.model,
                max_batch_size=max_batch_size,
                max_context=max_context,
                stop_token_ids=weights.stop_token_ids,
                prefix_cache_bytes=settings.prefix_cache_bytes,
                reserve_positions=min(max_context, KV_RESERVED_POSITIONS),
            )
    except PoolReservationError as error:
        raise ModelLoadError(str(error)) from error
    runner.grammars = grammar_compiler(weights, runner.vocab_size, settings.grammar_compile_timeout)
    runner.reserve_grammar_masks()
    pools = runner.memory_pools()
    log.info("memory_reserved", **{p.name: {"mib": round(p.bytes / 2**20, 1), **dict(p.figures)} for p in pools})
    _warm_up(runner, weights.tokenizer)
    tokenizer = weights.tokenizer
    if chat_template is not None:
        # A copy: the weights (and their tokenizer) may be shared by other servers.
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = chat_template
    decode_path = "dynamic"
    if isinstance(runner, StaticModelRunner):
        if runner.graphs.enabled:
            runner.capture_graphs(precapture_positions)
        decode_path = "static+cuda_graphs" if runner.graphs.captured else "static"
    source = weights.source
    return LoadedModel(
        model_id=source.model_id,
        aliases=source.aliases,
        model_size=size_label(source.model_id, weights.parameters),
        dtype=str(weights.dtype).removeprefix("torch."),
        device=str(weights.device),
        max_context=max_context,
        harmony=weights.harmony,
        tokenizer=tokenizer,
        runner=runner,
        stop_token_ids=weights.stop_token_ids,
        parameters=weights.parameters,
        grammars=runner.grammars,
        vocab_size=runner.vocab_size,
        decode_path=decode_path,
        memory_pools=pools,
        max_token_bytes=longest_token_bytes(weights.tokenizer),
        # gpt-oss's calls are Harmony messages (app.text.harmony_text), whatever the template.
        tool_call_syntax=None if weights.harmony else syntax_for(tokenizer.chat_template, settings.tool_call_parser),
        sampling_defaults=defaults,
    )


def default_sampling(weights: ModelWeights, mode: str, max_tokens_default: int | None) -> SamplingDefaults:
    """The sampling defaults in force for these weights under --generation-config ``mode``."""
    try:
        if mode == generation_defaults.VLLM:
            file = SamplingDefaults()
        elif mode == generation_defaults.AUTO:
            # from_pretrained read the model's generation_config.json (unset keys are None)
            own = getattr(weights.model, "generation_config", None)
            file = generation_defaults.from_generation_config(
                own.to_dict() if own is not None else {}, generation_defaults.GENERATION_CONFIG
            )
        else:
            where = str(Path(mode) / generation_defaults.GENERATION_CONFIG)
            file = generation_defaults.from_generation_config(GenerationConfig.from_pretrained(mode).to_dict(), where)
    except (OSError, ValueError) as error:  # GenerationConfigError is a ValueError
        raise ModelLoadError(f"--generation-config {mode}: {first_line(error)}") from error
    card = weights.source.card_sampling
    chosen = generation_defaults.sampling_defaults(mode, card, file, max_tokens_default)
    log.info("sampling_defaults", generation_config=mode, **chosen.shown())
    return chosen


def read_chat_template(path: str | None) -> str | None:
    """--chat-template's file, read (None: the model's own template is kept)."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"cannot read the chat template {path}: {first_line(error)}") from error


def grammar_compiler(
    weights: ModelWeights, vocab_size: int, compile_timeout: float = DEFAULT_COMPILE_TIMEOUT
) -> GrammarCompiler:
    """The grammar engine over the model's tokenizer; its vocabulary is read on first use."""
    markers = None
    if weights.harmony:
        from app.prompts.harmony_encoding import harmony_encoding

        encoding = harmony_encoding()
        (channel,) = encoding.encode("<|channel|>", allowed_special="all")
        (message,) = encoding.encode("<|message|>", allowed_special="all")
        (end,) = encoding.encode("<|return|>", allowed_special="all")
        (message_end,) = encoding.encode("<|end|>", allowed_special="all")
        (call,) = encoding.encode("<|call|>", allowed_special="all")
        markers = HarmonyMarkers(channel, message, tuple(encoding.encode("final")), end, message_end, call)
    return GrammarCompiler(
        weights.tokenizer, vocab_size, weights.stop_token_ids, markers, compile_timeout=compile_timeout
    )


def _static_runner(
    weights: ModelWeights, max_batch_size: int, max_context: int, capture: Capture | None, prefix_cache_bytes: int
) -> StaticModelRunner:
    shape = SlotShape.for_model(weights.model)
    needed = SlotKVCache.bytes_needed(shape, max_batch_size, max_context, weights.dtype)
    log.info("slot_cache", slots=max_batch_size, positions=max_context, gib=round(needed / 2**30, 2))
    try:
        return StaticModelRunner(
            weights.model,
            max_batch_size=max_batch_size,
            max_context=max_context,
            stop_token_ids=weights.stop_token_ids,
            cuda_graphs=True,
            graphs=StepGraphs(capture) if capture is not None else None,
            prefix_cache_bytes=prefix_cache_bytes,
        )
    except torch.cuda.OutOfMemoryError as error:
        raise ModelLoadError(
            f"the slot cache ({max_batch_size} slots x {max_context} positions, {needed / 2**30:.1f} GiB) does not "
            "fit: lower --max-batch-size or --max-seq-len"
        ) from error


def load_model(source: ModelSource, settings: ModelSettings, *, max_batch_size: int) -> LoadedModel:
    """``settings.tensor_parallel_size`` > 1: on rank 0 the runner is wrapped in the group's leader
    (each call runs on every rank); on the other ranks it is the local runner a follower drives.
    ``settings.expert_parallel``: the experts are sharded over those ranks too."""
    read_chat_template(settings.chat_template)  # before the weights: a wrong path fails at once
    weights = load_weights(
        source,
        dtype=settings.dtype,
        device=settings.device,
        tensor_parallel_size=settings.tensor_parallel_size,
        expert_parallel=settings.expert_parallel,
    )
    loaded = serve_weights(weights, settings, max_batch_size=max_batch_size)
    group = tensor_parallel.joined() if settings.tensor_parallel_size > 1 else None
    if group is None or group.rank != 0:
        return loaded
    leader = tensor_parallel.LeaderBackend(loaded.runner, group.channel)
    # The scheduler drives the leader; what it reads of the runner (rows, memory) is rank 0's.
    mode = "tensor parallel, expert parallel" if settings.expert_parallel else "tensor parallel"
    return dataclasses.replace(loaded, runner=leader, device=f"{loaded.device} x{group.size} ({mode})")  # type: ignore[arg-type]


def _warm_up(runner: BaseRunner, tokenizer: PreTrainedTokenizerBase) -> None:
    """One prefill and one decode step, so a broken model fails at start-up, not on a request."""
    prompt = tokenizer.encode("Hello", add_special_tokens=False) or [0]
    runner.add("warm-up", prompt, SamplingParams(max_tokens=2, temperature=0.0))
    try:
        runner.prefill([PrefillChunk("warm-up", len(prompt))])
        runner.decode(["warm-up"])
    finally:
        runner.release("warm-up")

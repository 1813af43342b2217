"""What is served and how it is loaded: the settings app.engine.loader takes whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.config.declare import setting
from app.config.values import ConfigError, check_positive

MIB = 1024 * 1024
# How tool calls in a chat template's own syntax are read back (app.text.template_calls): auto
# picks the syntax the template teaches; none reads none (tool_choice "auto" is then refused).
ToolCallParser = Literal["auto", "hermes", "llama3_json", "none"]
TOOL_CALL_PARSERS: tuple[ToolCallParser, ...] = ("auto", "hermes", "llama3_json", "none")


@dataclass(frozen=True)
class ModelSettings:
    """What is served and how it is loaded: what app.engine.loader.load_model takes."""

    # What ``python -m app`` and ``hypercorn ... app.asgi:app`` serve when no model is named.
    model: str = setting(
        "20b",
        "--model",
        help="what to serve: one of {models}; a local model folder; or a Hugging Face hub id (org/name, from "
        "the local cache when offline). tiny-gpt-oss and smollm2-135m are built on this machine on first use "
        "and need no network",
    )
    served_model_name: str | None = setting(
        None, "--served-model-name", help="the model name clients see (default: the model's id)"
    )
    dtype: str = setting(
        "auto",
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights and compute dtype; auto is bfloat16 on CUDA and float32 on the CPU "
        "(where batched greedy output then equals unbatched output)",
    )
    device: str = setting("auto", "--device", help="auto, cpu, cuda or cuda:N")
    # Off until it has been measured on a GPU.
    cuda_graphs: bool = setting(
        False,
        "--cuda-graphs",
        switch=True,
        help="static decode path: a KV cache of --max-batch-size slots allocated at start-up and "
        "decode steps captured as CUDA graphs (on the CPU the same path runs without graphs)",
    )
    max_seq_len: int | None = setting(
        None,
        "--max-seq-len",
        read=int,
        help="most tokens (prompt + generated) per sequence; default: the model's context, or 4096 "
        "with --cuda-graphs (every slot holds that many positions)",
    )
    # 1024 MiB: about 40,000 tokens of gpt-oss-20b prefixes in bfloat16 (its full-attention layers'
    # keys; the sliding layers keep only the window before each stored end), about 22,000 of
    # SmolLM2 in fp32.
    prefix_cache_bytes: int = setting(
        1024 * MIB,
        "--prefix-cache-mb",
        read=float,
        unit=MIB,
        help="megabytes of the prefix KV cache on the model's device: prompts that start like an "
        "earlier sequence (a shared system prompt, a chat's earlier turns) prefill only the rest; "
        "least recently used out first; 0 turns it off",
    )
    # None: app.models.generation_defaults decides.
    max_tokens_default: int | None = setting(
        None,
        "--max-tokens-default",
        read=int,
        metavar="N",
        help="max_tokens for a request that sets none (capped by the room its prompt leaves); "
        "default: the generation config's max_new_tokens, else {max_tokens}; 0: the rest of the context",
    )
    generation_config: str = setting(
        "auto",
        "--generation-config",
        metavar="auto|vllm|FOLDER",
        help="default sampling for the fields a request leaves out (vLLM's flag): auto takes the model "
        "card's recommendation and the model's generation_config.json, vllm the neutral values "
        "(temperature 1, top_p 1), FOLDER that folder's generation_config.json",
    )
    chat_template: str | None = setting(
        None,
        "--chat-template",
        metavar="PATH",
        help="a Jinja chat template file that replaces the model's own (for instance one that renders "
        "tools and <tool_call> calls, so that tool_choice auto is served)",
    )
    tool_call_parser: ToolCallParser = setting(
        "auto",
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        help="how a model without Harmony writes tool calls (tool_choice auto): auto reads the syntax "
        "its chat template teaches (hermes <tool_call> JSON, llama3_json), none refuses auto",
    )
    # A compile runs in a worker process of its own (app.engine.grammar_workers): one past this is
    # killed there, and its request (and the same grammar again) gets 400 invalid_response_format.
    grammar_compile_timeout: float = setting(
        10.0,
        "--grammar-compile-timeout",
        read=float,
        metavar="SECONDS",
        help="seconds one grammar (a response format, a forced call's tools) may take to compile; "
        "past it the compile is killed and the request gets 400",
    )
    # Every rank runs each step; app.config.values.launch_rank checks torchrun's WORLD_SIZE.
    tensor_parallel_size: int = setting(
        1,
        "--tensor-parallel-size",
        read=int,
        metavar="N",
        cli_only=True,
        help="shard the model over N ranks with transformers' tensor-parallel plan (NCCL on GPUs, "
        "gloo on the CPU); launch with torchrun --nproc-per-node N -m app ...: rank 0 serves HTTP",
    )
    expert_parallel: bool = setting(
        False,
        "--expert-parallel",
        "--enable-expert-parallel",  # vLLM's spelling
        switch=True,
        cli_only=True,
        help="with --tensor-parallel-size N: also shard a MoE model's experts over the N ranks "
        "(transformers' expert-parallel plan), each rank holding 1/N of them",
    )

    def __post_init__(self) -> None:
        check_positive(self, "grammar_compile_timeout")
        if self.max_tokens_default is not None and (
            isinstance(self.max_tokens_default, bool) or self.max_tokens_default < 0
        ):
            raise ConfigError(
                f"max_tokens_default must be 0 (the rest of the context) or more, got {self.max_tokens_default!r}"
            )
        if not self.generation_config.strip():
            raise ConfigError("generation_config must be auto, vllm or a folder holding generation_config.json")
        if self.max_seq_len is not None and (isinstance(self.max_seq_len, bool) or self.max_seq_len < 2):
            raise ConfigError(f"max_seq_len must be at least 2 tokens, got {self.max_seq_len!r}")
        if self.prefix_cache_bytes < 0:
            raise ConfigError(f"prefix_cache_bytes must not be negative, got {self.prefix_cache_bytes}")
        if isinstance(self.tensor_parallel_size, bool) or self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size!r}")
        if self.tensor_parallel_size > 1 and self.cuda_graphs:
            # Captured decode steps would hold the ranks' collectives: not built (nor measured) yet.
            raise ConfigError("--cuda-graphs does not work with --tensor-parallel-size > 1 yet")
        if self.expert_parallel and self.tensor_parallel_size == 1:
            raise ConfigError(
                "--expert-parallel shards the experts over the ranks of --tensor-parallel-size N (N > 1, "
                "under torchrun --nproc-per-node N); on one rank there is nothing to shard them over"
            )
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            choices = ", ".join(TOOL_CALL_PARSERS)
            raise ConfigError(f"tool_call_parser must be one of {choices}, got {self.tool_call_parser!r}")

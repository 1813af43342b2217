"""The model, its tokenizer and the served weights, made for a plan; what the machine offers."""

from __future__ import annotations

import dataclasses
import platform
from typing import Any

import torch

from tools.gpu_check.plan import GPT_OSS_20B, STOP_TOKENS, Plan


def model_config(plan: Plan) -> Any:
    from transformers import GptOssConfig

    if plan.mode == "cpu-smoke":
        from app.models.local_builds import tiny_gpt_oss_config

        return tiny_gpt_oss_config()
    return GptOssConfig(**GPT_OSS_20B)


def build_model(plan: Plan) -> Any:
    """Made on the device itself, in its dtype: no host copy, no checkpoint."""
    from transformers import AutoModelForCausalLM

    config = model_config(plan)
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = AutoModelForCausalLM.from_config(config, dtype=plan.dtype)
    if model.device.type != torch.device(plan.device).type:  # a transformers that built it elsewhere
        model.to(plan.device)
    model.eval()
    synchronize(plan)
    return model


def load_tokenizer(vocab_size: int) -> Any:
    """The o200k_harmony tokenizer: from the tiny-gpt-oss build when it is cached, else built."""
    from transformers import AutoTokenizer

    from app.models.local_builds import TINY_GPT_OSS_BUILD, cache_root

    cached = cache_root() / TINY_GPT_OSS_BUILD
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    from app.models.harmony_tokenizer import build_harmony_tokenizer

    return build_harmony_tokenizer(vocab_size)


def served_weights(plan: Plan, model: Any, tokenizer: Any) -> Any:
    from app.engine.loader import ModelWeights
    from app.models.registry import ModelSource

    name = "gpt-oss-20b-random" if plan.mode == "gpu" else "tiny-gpt-oss-random"
    return ModelWeights(
        source=ModelSource(name, "", (name,)),
        model=model,
        tokenizer=tokenizer,
        device=torch.device(plan.device),
        dtype=plan.dtype,
        harmony=True,
        max_context=int(model.config.max_position_embeddings),
        stop_token_ids=STOP_TOKENS,
        parameters=sum(p.numel() for p in model.parameters()),
    )


def implementations(model: Any) -> dict[str, str | None]:
    from app.engine.moe_loading import experts_in_use

    return {"experts": experts_in_use(model), "attention": str(model.config._attn_implementation)}


def preflight(plan: Plan) -> dict[str, Any]:
    """What decides whether capture can work, known before the (long) build: the device, and the
    implementations transformers picks for this config (from a model made on the meta device)."""
    from transformers import AutoModelForCausalLM

    info: dict[str, Any] = {"device": plan.device, "grouped_mm": hasattr(torch.nn.functional, "grouped_mm")}
    if plan.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        with torch.device("meta"):
            info.update(implementations(AutoModelForCausalLM.from_config(model_config(plan), dtype=plan.dtype)))
    except Exception as error:  # the build phase will fail and say why; the preflight only informs
        info["experts"] = info["attention"] = f"unknown ({type(error).__name__}: {error})"
    return info


def synchronize(plan: Plan) -> None:
    if plan.device.startswith("cuda"):
        torch.cuda.synchronize()


def release_memory(plan: Plan) -> None:
    if plan.device.startswith("cuda"):
        torch.cuda.empty_cache()


def environment(plan: Plan) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "mode": plan.mode,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "dtype"} | {"dtype": str(plan.dtype)},
    }
    if not plan.device.startswith("cuda"):
        info["cpu"] = platform.processor() or platform.machine()
    return info

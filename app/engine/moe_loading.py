"""How gpt-oss's mixture of experts is loaded: grouped GEMM experts, MXFP4 where kernels allow.

gpt-oss checkpoints ship their experts in MXFP4. transformers runs them in MXFP4 only with Triton
and the hub's ``gpt-oss-triton-kernels`` (fetched by the ``kernels`` package, so from the local
cache when offline); otherwise it dequantises them to bf16. We decide first and say which, in one
log line, rather than leave it to a warning deep in the load. Dequantised (or bf16) experts run on
``experts_implementation="grouped_mm"``: one grouped GEMM per projection for all experts, the
fastest of transformers' implementations and free of host synchronisation (CUDA graphs need that).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import structlog
import torch
from packaging.version import Version

log = structlog.get_logger("engine.moe")

EXPERTS_IMPLEMENTATION = "grouped_mm"
MIN_TRITON = Version("3.4.0")  # transformers' floor for MXFP4 on CUDA
MIN_CAPABILITY = (7, 5)


def _installed(package: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(package))
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def quantization_method(config: Any) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
    else:
        method = getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method)) if method is not None else None


def mxfp4_unavailable(
    device: torch.device,
    *,
    capability: Callable[[], tuple[int, int]] | None = None,
    installed: Callable[[str], Version | None] = _installed,
) -> str | None:
    """Why MXFP4 kernels cannot run here, or None when they may (the hub kernel may still be
    missing from the cache: the load then falls back, see ``load_options``)."""
    if device.type != "cuda":
        return f"MXFP4 kernels run on CUDA only, the model is on {device.type}"
    major, minor = capability() if capability is not None else torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return f"MXFP4 kernels need compute capability 7.5 or newer, this GPU has {major}.{minor}"
    triton = installed("triton")
    if triton is None or triton < MIN_TRITON:
        return f"MXFP4 kernels need triton >= {MIN_TRITON}, found {triton or 'none'}"
    if installed("kernels") is None:
        return "MXFP4 kernels are fetched by the 'kernels' package, which is not installed"
    return None


def load_options(config: Any, device: torch.device, *, mxfp4_reason: str | None = None) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for a gpt-oss checkpoint (none for other models).

    ``mxfp4_reason``: a reason to dequantise found earlier (a failed MXFP4 load), else it is
    worked out here.
    """
    if getattr(config, "model_type", None) != "gpt_oss":
        return {}
    if quantization_method(config) != "mxfp4":
        return {"experts_implementation": EXPERTS_IMPLEMENTATION}
    reason = mxfp4_reason or mxfp4_unavailable(device)
    if reason is None:
        log.info("mxfp4_experts", detail="experts stay in MXFP4 on the hub's Triton kernels")
        return {}
    from transformers.utils.quantization_config import Mxfp4Config

    log.warning("mxfp4_dequantized", reason=reason, detail=f"experts dequantised to bf16, {EXPERTS_IMPLEMENTATION}")
    return {"quantization_config": Mxfp4Config(dequantize=True), "experts_implementation": EXPERTS_IMPLEMENTATION}


def experts_in_use(model: torch.nn.Module) -> str | None:
    """What runs the experts of a loaded model: ``grouped_mm``, ``eager``, ``mxfp4``; None for a dense model."""
    config = getattr(model, "config", None)
    if getattr(config, "num_local_experts", None) is None:
        return None
    if any(type(module).__name__.startswith("Mxfp4") for module in model.modules()):
        return "mxfp4"
    return str(getattr(config, "_experts_implementation", None) or "eager")

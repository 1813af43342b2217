"""How gpt-oss's experts are loaded: grouped GEMM, and MXFP4 only where its kernels can run."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from packaging.version import Version

from app.engine import moe_loading
from app.engine.loader import ModelWeights

CUDA = torch.device("cuda")


def facts(**versions: str) -> Callable[[str], Version | None]:
    return lambda package: Version(versions[package]) if package in versions else None


def h100() -> tuple[int, int]:
    return (9, 0)


def test_mxfp4_needs_cuda_a_recent_gpu_triton_and_kernels() -> None:
    assert "CUDA only" in (moe_loading.mxfp4_unavailable(torch.device("cpu")) or "")
    old_gpu = moe_loading.mxfp4_unavailable(CUDA, capability=lambda: (7, 0), installed=facts())
    assert "7.5" in (old_gpu or "")
    no_triton = moe_loading.mxfp4_unavailable(CUDA, capability=h100, installed=facts(kernels="0.12"))
    assert "triton" in (no_triton or "")
    old_triton = moe_loading.mxfp4_unavailable(CUDA, capability=h100, installed=facts(triton="3.3.1", kernels="0.12"))
    assert "3.3.1" in (old_triton or "")
    no_kernels = moe_loading.mxfp4_unavailable(CUDA, capability=h100, installed=facts(triton="3.5.0"))
    assert "kernels" in (no_kernels or "")
    assert moe_loading.mxfp4_unavailable(CUDA, capability=h100, installed=facts(triton="3.5.0", kernels="0.12")) is None


def test_load_options_for_gpt_oss_checkpoints() -> None:
    dense = SimpleNamespace(model_type="llama")
    assert moe_loading.load_options(dense, CUDA) == {}
    bf16 = SimpleNamespace(model_type="gpt_oss")
    assert moe_loading.load_options(bf16, CUDA) == {"experts_implementation": "grouped_mm"}
    mxfp4 = SimpleNamespace(model_type="gpt_oss", quantization_config={"quant_method": "mxfp4"})
    on_cpu = moe_loading.load_options(mxfp4, torch.device("cpu"))
    assert on_cpu["experts_implementation"] == "grouped_mm"
    assert on_cpu["quantization_config"].dequantize is True
    failed = moe_loading.load_options(mxfp4, CUDA, mxfp4_reason="MXFP4 load failed: no kernel in the cache")
    assert failed["quantization_config"].dequantize is True


def test_the_tiny_gpt_oss_runs_grouped_mm_experts(tiny_weights: ModelWeights, smollm2_weights: ModelWeights) -> None:
    assert moe_loading.experts_in_use(tiny_weights.model) == "grouped_mm"
    assert moe_loading.experts_in_use(smollm2_weights.model) is None

"""What one rank of a tensor-parallel group holds of a model, asked by the caches as they size
themselves (app.engine.slot_cache) and by the group as it forms (app.engine.tensor_parallel): a
module of its own, so that the caches need not import the group that drives the runner."""

from __future__ import annotations

import torch


class TensorParallelError(RuntimeError):
    """The group cannot be formed; the message is one line saying why."""


def local_kv_heads(model: torch.nn.Module, kv_heads: int) -> int:
    """The key/value heads this rank holds: all of them unless the model's plan shards its key
    projections (gpt-oss's plan does not; Llama's does)."""
    size = int(getattr(model, "tp_size", None) or 1)
    if size <= 1:
        return kv_heads
    from transformers.distributed.tensor_parallel import get_kv_heads_per_rank

    heads = get_kv_heads_per_rank(dict(getattr(model, "tp_plan", None) or {}), kv_heads, size)
    if not isinstance(heads, int):
        raise TensorParallelError(f"{kv_heads} key/value heads cannot be split over {size} ranks")
    return heads

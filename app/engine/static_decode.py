"""The static decode step: one token per slot, from device buffers, in fixed-shape buckets.

A step decodes the first ``batch`` slots of the slot cache, attending over the first
``kv_length`` positions, with ``batch`` and ``kv_length`` rounded up to a few buckets. Inputs
(token, position, write position per slot) are copied into one preallocated device buffer before
the step; the attention masks are built on the device from the position buffer inside the step.
So the step has the same shapes and reads the same memory every time for a given bucket, which
is what a CUDA graph needs (``StepGraphs`` captures and replays it; without CUDA it runs eagerly).

Slots in the bucket that are not decoding (free, or still prefilling) are padding: they decode
token 0 at position 0 and write their key to the cache's scratch position; their logits are
ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from app.engine.attention_masks import MaskShapes
from app.engine.cuda_graphs import StepGraphs
from app.engine.slot_cache import SlotKVCache

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SMALLEST_KV_BUCKET = 256


@dataclass(frozen=True, slots=True)
class DecodeRow:
    slot: int
    token: int  # the newest token, not yet in the cache
    position: int  # its position: where its key is written and what its query sees up to


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    return (*(size for size in BATCH_BUCKETS if size < max_batch), max_batch)


def kv_buckets(max_positions: int, smallest: int = SMALLEST_KV_BUCKET) -> tuple[int, ...]:
    sizes: list[int] = []
    size = max(1, smallest)
    while size < max_positions:
        sizes.append(size)
        size *= 2
    return (*sizes, max_positions)


def bucket_for(needed: int, buckets: Sequence[int]) -> int:
    for size in buckets:
        if size >= needed:
            return size
    raise ValueError(f"{needed} is over the largest bucket, {buckets[-1]}")


class StaticDecoder:
    def __init__(
        self,
        model: PreTrainedModel,
        cache: SlotKVCache,
        masks: MaskShapes,
        cache_arg: str,
        graphs: StepGraphs,
        *,
        smallest_kv_bucket: int = SMALLEST_KV_BUCKET,
    ) -> None:
        self._model = model
        self._cache = cache
        self._masks = masks
        self._cache_arg = cache_arg
        self.graphs = graphs
        self._dtype = model.dtype
        # Rows: token ids, positions, write positions. One buffer, so one host-to-device copy a step.
        self._inputs = torch.zeros((3, cache.slots), dtype=torch.long, device=model.device)
        self.batch_buckets = batch_buckets(cache.slots)
        self.kv_buckets = kv_buckets(cache.positions, smallest_kv_bucket)

    def shape_for(self, rows: Sequence[DecodeRow], batch: int = 1, kv_length: int = 1) -> tuple[int, int]:
        """The (batch, kv_length) bucket a step over ``rows`` runs in."""
        slots = max([batch, *(row.slot + 1 for row in rows)])
        positions = max([kv_length, *(row.position + 1 for row in rows)])
        return bucket_for(slots, self.batch_buckets), bucket_for(positions, self.kv_buckets)

    def run(self, rows: Sequence[DecodeRow], *, batch: int = 1, kv_length: int = 1) -> torch.Tensor:
        """Logits [len(rows), vocab], one row per ``rows`` entry, in its order.

        ``batch``/``kv_length`` ask for at least that bucket (to capture a bucket ahead of use).
        """
        size, length = self.shape_for(rows, batch, kv_length)
        tokens = [0] * size
        positions = [0] * size
        writes = [self._cache.scratch_position] * size
        for row in rows:
            tokens[row.slot] = row.token
            positions[row.slot] = writes[row.slot] = row.position
        self._inputs[:, :size].copy_(torch.tensor([tokens, positions, writes], dtype=torch.long))
        logits = self.graphs.run((size, length), lambda: self._forward(size, length))
        return logits[[row.slot for row in rows]]

    def _forward(self, size: int, length: int) -> torch.Tensor:
        tokens, positions, writes = self._inputs[0, :size], self._inputs[1, :size], self._inputs[2, :size]
        self._cache.plan_decode(writes, size, length)
        try:
            output = self._model(
                input_ids=tokens[:, None],
                position_ids=positions[:, None],
                attention_mask=self._masks.decode(positions, length, self._dtype),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: self._cache},
            )
        finally:
            self._cache.clear_plan()
        logits: torch.Tensor = output.logits[:, -1]
        return logits

"""A KV cache of fixed slots, allocated once: the cache behind the static (CUDA graph) decode path.

Every layer holds ``[slots, kv_heads, positions + 1, head_dim]`` keys and values from start-up on;
nothing grows and nothing moves. A sequence takes the lowest free slot when it joins and just gives
it back when it leaves, so the sequences that stay are never copied. The extra last position is
scratch: rows of a padded decode batch that are not decoding write their throwaway key there, and
no query ever attends to it.

A decode step writes one key per row with ``scatter_`` at positions read from a device tensor, and
attends over the first ``batch`` slots and ``kv_length`` positions: fixed shapes for a given
(batch, kv_length) bucket, no host-to-device copy, so the step can be captured as a CUDA graph.
Packed prefills (eager, any shape) write and gather like the row cache.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.kv_cache import PlannedCache, PrefillWrites, write_packed_prefill
from app.engine.shards import local_kv_heads


@dataclass(frozen=True, slots=True)
class SlotShape:
    num_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def for_config(cls, config: Any) -> SlotShape:
        heads = int(config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(int(config.num_hidden_layers), int(kv_heads), int(head_dim))

    @classmethod
    def for_model(cls, model: Any) -> SlotShape:
        """The shape of this rank's keys: under tensor parallel it may hold only some of the heads."""
        shape = cls.for_config(model.config.get_text_config())
        return cls(shape.num_layers, local_kv_heads(model, shape.kv_heads), shape.head_dim)


@dataclass(frozen=True, slots=True)
class _DecodeWrites:
    write_positions: torch.Tensor  # [batch] on the device: where each row's new key goes
    batch: int
    kv_length: int


class SlotKVCache(PlannedCache):
    def __init__(
        self, shape: SlotShape, slots: int, positions: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        if slots < 1 or positions < 1:
            raise ValueError(f"a slot cache needs at least one slot and one position, got {slots} x {positions}")
        self.shape = shape
        self.slots = slots
        self.positions = positions
        self.scratch_position = positions  # the extra last column
        size = (slots, shape.kv_heads, positions + 1, shape.head_dim)
        self._keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self._values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self._free = list(range(slots))  # a heap: the lowest free slot is taken first

    @staticmethod
    def bytes_needed(shape: SlotShape, slots: int, positions: int, dtype: torch.dtype) -> int:
        per_layer = 2 * slots * shape.kv_heads * (positions + 1) * shape.head_dim
        return per_layer * shape.num_layers * torch.finfo(dtype).bits // 8

    # -- slots -----------------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))

    def take_slot(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.slots} slots are in use")
        return heapq.heappop(self._free)

    def free_slot(self, slot: int) -> None:
        """Give a slot back. Its keys stay where they are: the next owner overwrites them from 0."""
        if not 0 <= slot < self.slots or slot in self._free:
            raise ValueError(f"slot {slot} is not in use")
        heapq.heappush(self._free, slot)

    @torch.inference_mode()
    def copy_slot(self, source: int, target: int, length: int) -> None:
        """A forked sequence's start: the first ``length`` positions of ``source`` into ``target``,
        in place (a captured graph reads these same tensors). Sliding-window layers keep every
        position here too, so the copy is exact for every layer."""
        if length > self.positions:
            raise ValueError(f"cannot copy {length} positions of a {self.positions}-position slot")
        for tensor in (*self._keys, *self._values):
            tensor[target, :, :length] = tensor[source, :, :length]

    # -- the prefix cache's access ---------------------------------------------------------------
    def read_keys(self, row: int, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._keys[layer][row, :, start:end], self._values[layer][row, :, start:end]

    @torch.inference_mode()
    def write_keys(self, row: int, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A cached prefix into a slot, in place (a captured graph reads these same tensors)."""
        end = start + keys.shape[1]
        if end > self.positions:
            raise ValueError(f"cannot write {end} positions into a {self.positions}-position slot")
        self._keys[layer][row, :, start:end] = keys
        self._values[layer][row, :, start:end] = values

    def reserve(self, rows: int, positions: int) -> None:
        """Nothing to grow: only check the bounds (the runners' common interface)."""
        if rows > self.slots or positions > self.positions:
            raise ValueError(f"cache holds at most {self.slots} slots x {self.positions} positions")

    # -- per-forward plans -----------------------------------------------------------------------
    def plan_decode(self, write_positions: torch.Tensor, batch: int, kv_length: int) -> None:
        if batch > self.slots or kv_length > self.positions:
            raise ValueError(f"decode over {batch} slots x {kv_length} positions exceeds the cache")
        self._plan = _DecodeWrites(write_positions, batch, kv_length)

    # -- the interface transformers' attention layers call ---------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        if key_states.shape[1] != keys.shape[1] or key_states.shape[3] != keys.shape[3]:
            raise ValueError(
                f"layer {layer_idx} gives keys of {tuple(key_states.shape)}, the cache was made for "
                f"{keys.shape[1]} heads of {keys.shape[3]}"
            )
        plan = self._plan
        if isinstance(plan, _DecodeWrites):
            batch = plan.batch
            # [batch, heads, 1, head_dim] index: row r writes at write_positions[r] in its own slot.
            index = plan.write_positions.view(batch, 1, 1, 1).expand(batch, keys.shape[1], 1, keys.shape[3])
            keys[:batch].scatter_(2, index, key_states)
            values[:batch].scatter_(2, index, value_states)
            return keys[:batch, :, : plan.kv_length], values[:batch, :, : plan.kv_length]
        if isinstance(plan, PrefillWrites):
            return write_packed_prefill(keys, values, key_states, value_states, plan.segments)
        raise RuntimeError("SlotKVCache.update called without a plan for this forward")

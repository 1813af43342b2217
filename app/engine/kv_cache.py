"""A KV cache of rows: one sequence per row, each from position 0, no padding, no merging.

transformers' attention layers call ``update(key, value, layer_idx)``; which rows and positions the
new keys go to is set by the runner for each forward (``plan_decode`` / ``plan_prefill``). Sequences
join by taking a free row and leave by having the last row moved into theirs, so the rows in use
are always ``0..rows_in_use-1`` and a decode step attends over a plain slice.

A server's row cache is reserved at start-up (``reserve_at_start``: every row, the first positions
of each) and kept for the process's life, so its memory does not follow the traffic; a sequence
longer than the reservation grows the positions (doubling, up to ``max_positions``), which stay.
Without a reservation (a runner built for a test or a tool) storage grows by doubling, rows and
positions, and is dropped when the last sequence leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import torch

from app.engine.memory_pools import MiB, PoolReservationError, check_fits

log = structlog.get_logger("engine.kv_cache")


@dataclass(frozen=True, slots=True)
class Segment:
    """One sequence's slice of a packed prefill: ``length`` tokens written from ``start`` in ``row``."""

    row: int
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class _DecodeWrites:
    positions: torch.Tensor  # [rows], the position each row's new key is written to
    kv_length: int
    first_row: int  # the decode covers rows first_row .. first_row + len(positions) - 1


@dataclass(frozen=True, slots=True)
class PrefillWrites:
    """Where a packed forward's new keys go, segment by segment (the cache's part of a step)."""

    segments: tuple[Segment, ...]


class PlannedCache:
    """What the row and slot caches share: a plan set by the runner before each forward (which
    rows and positions the new keys go to), and what transformers' model code may ask of any
    cache object."""

    _plan: object = None

    def plan_prefill(self, segments: tuple[Segment, ...]) -> None:
        self._plan = PrefillWrites(segments)

    def clear_plan(self) -> None:
        self._plan = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False


def write_packed_prefill(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    segments: tuple[Segment, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a packed prefill's new keys into their rows; return the keys its queries attend to.

    ``keys``/``values`` are [rows, heads, positions, head_dim]; the new states are packed along
    the sequence axis of a batch of one, segment after segment.
    """
    offset = 0
    for seg in segments:
        span = slice(seg.start, seg.start + seg.length)
        keys[seg.row, :, span] = key_states[0, :, offset : offset + seg.length]
        values[seg.row, :, span] = value_states[0, :, offset : offset + seg.length]
        offset += seg.length
    if all(seg.start == 0 for seg in segments):
        return key_states, value_states  # nothing cached before: attend to the packed keys
    # Each segment attends to its row's cached prefix and its own new keys, packed alike.
    gathered_k = [keys[seg.row, :, : seg.start + seg.length] for seg in segments]
    gathered_v = [values[seg.row, :, : seg.start + seg.length] for seg in segments]
    return torch.cat(gathered_k, dim=1)[None], torch.cat(gathered_v, dim=1)[None]


def _grown(size: int, needed: int, floor: int) -> int:
    size = max(size, floor)
    while size < needed:
        size *= 2
    return size


class RowKVCache(PlannedCache):
    MIN_POSITIONS = 64
    MIN_ROWS = 2

    def __init__(self, num_layers: int, max_rows: int, max_positions: int) -> None:
        self.num_layers = num_layers
        self.max_rows = max_rows
        self.max_positions = max_positions
        self._rows = 0
        self._positions = 0
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self.reserved_positions = 0  # kept from start-up on (0: none, storage follows the rows in use)

    # -- storage -----------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values) if t is not None)

    @staticmethod
    def bytes_needed(
        num_layers: int, rows: int, kv_heads: int, positions: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * rows * kv_heads * positions * head_dim * torch.empty((), dtype=dtype).element_size()

    def reserve_at_start(
        self, kv_heads: int, head_dim: int, positions: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        """Every row and ``positions`` positions of every layer, zero-filled now (resident) and kept:
        a PoolReservationError when the device has not that much free."""
        positions = min(positions, self.max_positions)
        needed = self.bytes_needed(self.num_layers, self.max_rows, kv_heads, positions, head_dim, dtype)
        what = f"the KV cache ({self.max_rows} rows x {positions} positions)"
        check_fits(needed, device, what, "--max-batch-size")
        shape = (self.max_rows, kv_heads, positions, head_dim)
        try:
            for store in (self._keys, self._values):
                for layer in range(self.num_layers):
                    store[layer] = torch.zeros(shape, dtype=dtype, device=device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            self.release()
            raise PoolReservationError(f"{what} needs {needed / MiB:.0f} MiB on {device}: it did not fit") from error
        self._rows, self._positions = self.max_rows, positions
        self.reserved_positions = positions

    def reserve(self, rows: int, positions: int) -> None:
        """Make room for ``rows`` rows of ``positions`` positions; existing contents are kept.

        Layer by layer, so growing never needs twice the memory at once. If the accelerator runs
        out of memory half-way (the runner retries the step split in two), the layers already
        grown stay grown and the rest as they were: every layer still holds its rows, and the next
        reserve grows only the ones that are short."""
        if rows > self.max_rows or positions > self.max_positions:
            raise ValueError(f"cache holds at most {self.max_rows} rows x {self.max_positions} positions")
        new_rows = min(_grown(self._rows, rows, self.MIN_ROWS), self.max_rows)
        new_positions = min(_grown(self._positions, positions, self.MIN_POSITIONS), self.max_positions)
        if (new_rows, new_positions) == (self._rows, self._positions):
            return
        for store in (self._keys, self._values):
            for layer, old in enumerate(store):
                if old is None or (old.shape[0] >= new_rows and old.shape[2] >= new_positions):
                    continue
                shape = (max(new_rows, old.shape[0]), old.shape[1], max(new_positions, old.shape[2]), old.shape[3])
                bigger = old.new_zeros(shape)
                bigger[: old.shape[0], :, : old.shape[2]] = old
                store[layer] = bigger
        self._rows, self._positions = new_rows, new_positions
        if self.reserved_positions:
            log.warning("kv_cache_grown", rows=new_rows, positions=new_positions, mib=self.allocated_bytes // MiB)

    def release(self) -> None:
        """Drop all storage (the runner calls this when no sequence is left); a reservation stays."""
        if self.reserved_positions:
            return
        self._keys = [None] * self.num_layers
        self._values = [None] * self.num_layers
        self._rows = self._positions = 0

    def move_row(self, source: int, target: int, length: int) -> None:
        for store in (self._keys, self._values):
            for tensor in store:
                # A row past the storage never had a forward (its prefill failed or never ran):
                # there is nothing of it to move.
                if tensor is not None and source < tensor.shape[0]:
                    tensor[target, :, :length] = tensor[source, :, :length]

    @torch.inference_mode()
    def copy_row(self, source: int, target: int, length: int) -> None:
        """A forked sequence's start: the first ``length`` positions of ``source`` into ``target``
        (grown to hold it). Exact for every layer: sliding-window layers keep every position too
        (their window is in the attention mask), so the copy is the keys a prefill would write."""
        self.reserve(max(self._rows, target + 1), max(self._positions, length))
        for store in (self._keys, self._values):
            for tensor in store:
                if tensor is not None:
                    tensor[target, :, :length] = tensor[source, :, :length]

    # -- the prefix cache's access -----------------------------------------------------------
    def read_keys(self, row: int, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        keys, values = self._keys[layer], self._values[layer]
        if keys is None or values is None or row >= keys.shape[0]:
            return None
        return keys[row, :, start:end], values[row, :, start:end]

    @torch.inference_mode()
    def write_keys(self, row: int, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A cached prefix into ``row`` (grown to hold it; a layer not made yet is made now, shaped
        like what it is given)."""
        end = start + keys.shape[1]
        self.reserve(max(self._rows, row + 1), max(self._positions, end))
        if self._keys[layer] is None:
            shape = (self._rows, keys.shape[0], self._positions, keys.shape[2])
            self._keys[layer] = keys.new_zeros(shape)
            self._values[layer] = values.new_zeros(shape)
        stored_keys, stored_values = self._keys[layer], self._values[layer]
        assert stored_keys is not None and stored_values is not None
        stored_keys[row, :, start:end] = keys
        stored_values[row, :, start:end] = values

    # -- per-forward plans -------------------------------------------------------------------
    def plan_decode(self, positions: torch.Tensor, kv_length: int, first_row: int = 0) -> None:
        self._plan = _DecodeWrites(positions, kv_length, first_row)

    # -- the interface transformers' attention layers call -----------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._layer(layer_idx, key_states)
        plan = self._plan
        if isinstance(plan, _DecodeWrites):
            batch = key_states.shape[0]
            rows = torch.arange(plan.first_row, plan.first_row + batch, device=keys.device)
            keys[rows, :, plan.positions] = key_states[:, :, 0]
            values[rows, :, plan.positions] = value_states[:, :, 0]
            span = slice(plan.first_row, plan.first_row + batch)
            return keys[span, :, : plan.kv_length], values[span, :, : plan.kv_length]
        if isinstance(plan, PrefillWrites):
            return write_packed_prefill(keys, values, key_states, value_states, plan.segments)
        raise RuntimeError("RowKVCache.update called without a plan for this forward")

    def _layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._keys[layer_idx]
        values = self._values[layer_idx]
        if keys is None or values is None:
            # Heads and head size come from the layer itself, so any attention shape is served.
            shape = (self._rows, like.shape[1], self._positions, like.shape[3])
            keys = like.new_zeros(shape)
            values = like.new_zeros(shape)
            self._keys[layer_idx], self._values[layer_idx] = keys, values
        return keys, values

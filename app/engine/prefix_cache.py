"""A prefix KV cache: keys and values of token prefixes that sequences left behind, reused by the
next sequence whose prompt starts with the same tokens. Torch only; the runner calls it from its
one worker thread.

Storage is in blocks of ``block_tokens`` positions, keyed by a hash chain (BLAKE2b of the parent
block's key and the block's token ids: our own keys, never a client's value); each block keeps its
token ids and parent too, so a lookup is exact even if two keys ever collided. A block holds, for
positions ``[i*B, (i+1)*B)``, the keys and values of every full-attention layer, and those of the
sliding-window layers only when it lies in the window before an end point a sequence stored (its
end, or where it left a chain already cached: a branch, such as the end of a shared system prompt):
a sliding layer of window ``w`` never looks further back than ``w - 1`` positions, so a sequence
that resumes at ``L`` needs its sliding layers' keys for ``[L - w, L)`` only (the earlier
positions of its row may hold anything: the attention mask hides them). A match at ``L`` is valid
only when those blocks have their sliding part.

Bounded in bytes, least recently used out first; a block that a running sequence matched is
pinned (reference counted) until that sequence is released, and is never evicted. Along a chain a
parent is always used more recently than its children, so eviction takes the deepest blocks first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from app.contract.step import PrefixCacheStats

DEFAULT_BLOCK_TOKENS = 32
_ROOT = b""


@dataclass(frozen=True, slots=True)
class LayerLayout:
    """Which layers attend to everything and which to a sliding window (of one size)."""

    full: tuple[int, ...]
    sliding: tuple[int, ...]
    window: int | None  # the sliding layers' window (positions seen, the query's own included)

    @classmethod
    def for_config(cls, config: Any) -> LayerLayout:
        layers = int(config.num_hidden_layers)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if not layer_types:
            # No per-layer types: a sliding_window means every layer slides (Mistral), else none.
            everything = tuple(range(layers))
            return cls((), everything, int(window)) if window else cls(everything, (), None)
        full = tuple(i for i, kind in enumerate(layer_types) if kind != "sliding_attention" or not window)
        sliding = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention" and window)
        return cls(full, sliding, int(window) if sliding and window else None)


class KeyRows(Protocol):
    """What the prefix cache needs of a runner's KV cache (RowKVCache, SlotKVCache)."""

    def read_keys(self, row: int, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of ``row``'s keys and values [heads, end - start, head_dim] (None: nothing yet)."""
        ...

    def write_keys(self, row: int, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write [heads, n, head_dim] keys and values into ``row`` from ``start``."""
        ...


@dataclass(slots=True)
class _Block:
    parent: bytes
    tokens: tuple[int, ...]
    full: torch.Tensor | None  # [full layers, 2, heads, B, head_dim]
    sliding: torch.Tensor | None  # [sliding layers, 2, heads, B, head_dim], near end points only

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.full, self.sliding) if t is not None)


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest usable cached prefix of a prompt: ``length`` positions in ``blocks``."""

    blocks: tuple[bytes, ...] = ()
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    @property
    def length(self) -> int:
        return len(self.blocks) * self.block_tokens


@dataclass(slots=True)
class _Counters:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    pins: Counter[bytes] = field(default_factory=Counter)


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class PrefixKVCache:
    def __init__(self, layout: LayerLayout, max_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        if max_bytes < 0 or block_tokens < 1:
            raise ValueError(
                f"a prefix cache needs max_bytes >= 0 and block_tokens >= 1, got {max_bytes}, {block_tokens}"
            )
        self.layout = layout
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._counts = _Counters()

    # -- what the runner asks --------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return self._bytes

    def stats(self) -> PrefixCacheStats:
        c = self._counts
        return PrefixCacheStats(c.lookups, c.hits, c.hit_tokens, self._bytes, len(self._blocks), c.evictions)

    def pinned(self, key: bytes) -> int:
        return self._counts.pins[key]

    @property
    def pinned_blocks(self) -> int:
        """Blocks that some running sequence holds."""
        return len(self._counts.pins)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def chain(self, tokens: Sequence[int]) -> list[bytes]:
        """The keys of ``tokens``' whole blocks, root first (whether cached or not)."""
        keys, parent, size = [], _ROOT, self.block_tokens
        for start in range(0, len(tokens) - size + 1, size):
            parent = block_key(parent, tokens[start : start + size])
            keys.append(parent)
        return keys

    def lookup(self, prompt: Sequence[int]) -> PrefixMatch:
        """The longest cached prefix ``prompt`` may start from, always short of its last token (whose
        logits give the first new token). Counted as a lookup when the prompt is long enough to
        match a block at all; the blocks matched are touched."""
        if len(prompt) > self.block_tokens:
            self._counts.lookups += 1
        size, parent = self.block_tokens, _ROOT
        found: list[bytes] = []
        for start in range(0, len(prompt) - 1 - size + 1, size):
            ids = tuple(prompt[start : start + size])
            key = block_key(parent, ids)
            block = self._blocks.get(key)
            if block is None or block.tokens != ids or block.parent != parent:
                break
            found.append(key)
            parent = key
        count = len(found)
        while count and not self._resumable(found, count):
            count -= 1
        match = PrefixMatch(tuple(found[:count]), size)
        if match.blocks:
            self._counts.hits += 1
            self._counts.hit_tokens += match.length
            self._touch(match.blocks)
        return match

    def pin(self, keys: Sequence[bytes]) -> None:
        self._counts.pins.update(keys)

    def unpin(self, keys: Sequence[bytes]) -> None:
        pins = self._counts.pins
        for key in keys:
            pins[key] -= 1
            if pins[key] <= 0:
                del pins[key]

    @torch.inference_mode()
    def load(self, match: PrefixMatch, rows: KeyRows, row: int) -> int:
        """Copy a match into ``row``: every full layer from 0, the sliding layers only over the
        window before its end. Returns the first position the sliding layers hold for real."""
        if not match.blocks:
            return 0
        size, length = self.block_tokens, match.length
        blocks = [self._blocks[key] for key in match.blocks]
        if self.layout.full:
            full = torch.cat([b.full for b in blocks if b.full is not None], dim=3)
            for index, layer in enumerate(self.layout.full):
                rows.write_keys(row, layer, 0, full[index, 0], full[index, 1])
        sliding_from = length
        if self.layout.sliding:
            first = self._first_sliding_block(length)
            sliding = torch.cat([b.sliding for b in blocks[first:] if b.sliding is not None], dim=3)
            sliding_from = first * size
            for index, layer in enumerate(self.layout.sliding):
                rows.write_keys(row, layer, sliding_from, sliding[index, 0], sliding[index, 1])
        return sliding_from

    @torch.inference_mode()
    def store(self, tokens: Sequence[int], end: int, rows: KeyRows, row: int, sliding_from: int = 0) -> int:
        """Keep the whole blocks of ``row``'s first ``end`` positions (``tokens[:end]`` in it): the full
        layers' part of each, the sliding layers' part of those in the window before ``end`` (and at
        or after ``sliding_from``, the first position whose sliding keys in the row are real).
        Returns the blocks added or completed; stops, without evicting, when the rest would not fit."""
        if self.max_bytes == 0:
            return 0
        size = self.block_tokens
        keys = self.chain(tokens[: (end // size) * size])
        if not keys:
            return 0
        whole = len(keys) * size
        need_full = [i for i, key in enumerate(keys) if key not in self._blocks]
        # The sliding layers' window before the end, and before the point where this sequence leaves
        # a chain already cached (a branch: the next prompt that shares that start resumes there).
        ends = [len(keys)] + ([need_full[0]] if need_full and need_full[0] > 0 else [])
        windows = sorted({i for end in ends for i in self._sliding_blocks(end)})
        need_sliding = [
            i
            for i in windows
            if i * size >= sliding_from and (keys[i] not in self._blocks or self._blocks[keys[i]].sliding is None)
        ]
        if not need_full and not need_sliding:
            self._touch(keys)
            return 0
        # Read only from the first block wanted (the blocks before it are cached already).
        full_from = need_full[0] * size if need_full else whole
        sliding_from_block = need_sliding[0] * size if need_sliding else whole
        full = self._read(rows, row, self.layout.full, full_from, whole) if need_full and self.layout.full else None
        sliding = self._read(rows, row, self.layout.sliding, sliding_from_block, whole) if need_sliding else None
        if (need_full and self.layout.full and full is None) or (need_sliding and sliding is None):
            return 0  # the row has no storage (it never ran a forward)
        self._touch([key for key in keys if key in self._blocks])
        protected = set(keys)
        added = 0
        wanted_sliding = set(need_sliding)
        for i, key in enumerate(keys):
            span = slice(i * size, (i + 1) * size)
            full_span = slice(i * size - full_from, (i + 1) * size - full_from)
            sliding_span = slice(i * size - sliding_from_block, (i + 1) * size - sliding_from_block)
            block = self._blocks.get(key)
            if block is None:
                part = None if full is None else full[:, :, :, full_span].clone()
                extra = sliding[:, :, :, sliding_span].clone() if sliding is not None and i in wanted_sliding else None
                block = _Block(keys[i - 1] if i else _ROOT, tuple(tokens[span]), part, extra)
                if not self._make_room(block.nbytes, protected):
                    break
                self._blocks[key] = block
                self._bytes += block.nbytes
                added += 1
            elif i in wanted_sliding and sliding is not None:
                extra = sliding[:, :, :, sliding_span].clone()
                if not self._make_room(extra.numel() * extra.element_size(), protected):
                    break
                block.sliding = extra
                self._bytes += extra.numel() * extra.element_size()
                added += 1
        self._touch([key for key in keys if key in self._blocks])
        return added

    # -- inside -----------------------------------------------------------------------------------
    def _sliding_blocks(self, blocks: int) -> range:
        """The blocks whose sliding part a sequence resuming after ``blocks`` blocks needs."""
        if not self.layout.sliding:
            return range(0)
        return range(self._first_sliding_block(blocks * self.block_tokens), blocks)

    def _first_sliding_block(self, length: int) -> int:
        """The first block a sequence resuming at ``length`` needs the sliding layers' keys of."""
        assert self.layout.window is not None
        return max(0, length - self.layout.window) // self.block_tokens

    def _resumable(self, found: list[bytes], count: int) -> bool:
        if not self.layout.sliding:
            return True
        first = self._first_sliding_block(count * self.block_tokens)
        return all(self._blocks[key].sliding is not None for key in found[first:count])

    def _touch(self, keys: Sequence[bytes]) -> None:
        # Deepest first, the root last: the root ends up the most recently used, so a chain is
        # evicted from its end, never cut in the middle before its descendants are gone.
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _make_room(self, nbytes: int, protected: set[bytes]) -> bool:
        if nbytes > self.max_bytes:
            return False
        pins = self._counts.pins
        victims = iter([key for key in self._blocks if key not in pins and key not in protected])
        while self._bytes + nbytes > self.max_bytes:
            victim = next(victims, None)
            if victim is None:
                return False
            self._bytes -= self._blocks.pop(victim).nbytes
            self._counts.evictions += 1
        return True

    @staticmethod
    def _read(rows: KeyRows, row: int, layers: tuple[int, ...], start: int, end: int) -> torch.Tensor | None:
        """[layers, 2, heads, end - start, head_dim]: ``row``'s positions ``start..end-1`` of ``layers``."""
        parts = []
        for layer in layers:
            kv = rows.read_keys(row, layer, start, end)
            if kv is None:
                return None
            parts.append(torch.stack(kv))
        return torch.stack(parts)

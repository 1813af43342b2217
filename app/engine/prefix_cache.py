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

The first block's parent is the request's namespace (``SamplingParams.prefix_salt``: a hash of
its tenant and its ``cache_salt``, made by the HTTP layer), so a chain is found only by requests
of the same tenant and salt: one tenant cannot learn from ``cached_tokens`` what another sent.

Kept in a page pool reserved at start-up (app.engine.memory_pools; a page is one layer's part of
one block), so a full cache holds no more memory than an empty one; least recently used out
first. A block that a running sequence matched is pinned (reference counted) until that sequence
is released, and is never evicted. Along a chain a parent is always used more recently than its
children, so eviction takes the deepest blocks first.
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
from app.engine.memory_pools import PagePool

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
    full: tuple[int, ...]  # a page per full-attention layer (none when the model has none)
    sliding: tuple[int, ...] | None  # a page per sliding layer, near end points only

    @property
    def pages(self) -> tuple[int, ...]:
        return self.full + (self.sliding or ())


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


@dataclass(slots=True)
class _Placed:
    """What one store takes pages for before any is written: blocks to add (chain index, key, block)
    and sliding parts to complete (chain index, pages)."""

    new: list[tuple[int, bytes, _Block]] = field(default_factory=list)
    completed: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    def pages(self) -> list[tuple[int, ...]]:
        return [block.pages for _, _, block in self.new] + [pages for _, pages in self.completed]


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class PrefixKVCache:
    def __init__(self, layout: LayerLayout, pool: PagePool) -> None:
        self.layout = layout
        self.pool = pool
        self.block_tokens = pool.shape.block_tokens
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._counts = _Counters()

    # -- what the runner asks --------------------------------------------------------------------
    @property
    def max_bytes(self) -> int:
        return self.pool.reserved_bytes

    @property
    def size_bytes(self) -> int:
        return self.pool.used_pages * self.pool.page_bytes

    def stats(self) -> PrefixCacheStats:
        c = self._counts
        return PrefixCacheStats(c.lookups, c.hits, c.hit_tokens, self.size_bytes, len(self._blocks), c.evictions)

    def pinned(self, key: bytes) -> int:
        return self._counts.pins[key]

    @property
    def pinned_blocks(self) -> int:
        """Blocks that some running sequence holds."""
        return len(self._counts.pins)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def chain(self, tokens: Sequence[int], salt: bytes = _ROOT) -> list[bytes]:
        """The keys of ``tokens``' whole blocks in namespace ``salt``, root first (cached or not)."""
        keys, parent, size = [], salt, self.block_tokens
        for start in range(0, len(tokens) - size + 1, size):
            parent = block_key(parent, tokens[start : start + size])
            keys.append(parent)
        return keys

    def lookup(self, prompt: Sequence[int], salt: bytes = _ROOT) -> PrefixMatch:
        """The longest cached prefix ``prompt`` may start from in namespace ``salt``, always short of
        its last token (whose logits give the first new token). Counted as a lookup when the prompt
        is long enough to match a block at all; the blocks matched are touched."""
        if len(prompt) > self.block_tokens:
            self._counts.lookups += 1
        size, parent = self.block_tokens, salt
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
        blocks = [self._blocks[key] for key in match.blocks]
        for index, layer in enumerate(self.layout.full):
            rows.write_keys(row, layer, 0, *self.pool.read([b.full[index] for b in blocks]))
        sliding_from = match.length
        if self.layout.sliding:
            first = self._first_sliding_block(match.length)
            sliding_from = first * self.block_tokens
            near = [b.sliding for b in blocks[first:] if b.sliding is not None]
            for index, layer in enumerate(self.layout.sliding):
                rows.write_keys(row, layer, sliding_from, *self.pool.read([pages[index] for pages in near]))
        return sliding_from

    @torch.inference_mode()
    def store(
        self, tokens: Sequence[int], end: int, rows: KeyRows, row: int, sliding_from: int = 0, salt: bytes = _ROOT
    ) -> int:
        """Keep the whole blocks of ``row``'s first ``end`` positions (``tokens[:end]`` in it, in
        namespace ``salt``): the full layers' part of each, the sliding layers' part of those in
        the window before ``end`` (and at or after ``sliding_from``, the first position whose
        sliding keys in the row are real). Returns the blocks added or completed; stops, without
        evicting what it needs, when the rest would not fit."""
        size = self.block_tokens
        keys = self.chain(tokens[: (end // size) * size], salt)
        if not keys or not self.pool.pages:
            return 0
        need_full = [i for i, key in enumerate(keys) if key not in self._blocks]
        # The sliding layers' window before the end, and before the point where this sequence leaves
        # a chain already cached (a branch: the next prompt that shares that start resumes there).
        ends = [len(keys)] + ([need_full[0]] if need_full and need_full[0] > 0 else [])
        windows = sorted({i for end in ends for i in self._sliding_blocks(end)})
        need_sliding = {
            i
            for i in windows
            if i * size >= sliding_from and (keys[i] not in self._blocks or self._blocks[keys[i]].sliding is None)
        }
        if not need_full and not need_sliding:
            self._touch(keys)
            return 0
        layers = (*self.layout.full, *self.layout.sliding)
        if any(rows.read_keys(row, layer, 0, len(keys) * size) is None for layer in layers):
            return 0  # the row has no storage (it never ran a forward)
        self._touch([key for key in keys if key in self._blocks])
        placed = self._place(tokens, keys, salt, need_sliding)
        try:
            self._copy_in(rows, row, self.layout.full, [(i, block.full) for i, _, block in placed.new])
            sliding = [(i, block.sliding) for i, _, block in placed.new if block.sliding is not None]
            self._copy_in(rows, row, self.layout.sliding, sorted([*sliding, *placed.completed]))
        except Exception:
            for pages in placed.pages():
                self.pool.give(pages)
            raise
        for _, key, block in placed.new:
            self._blocks[key] = block
        for i, pages in placed.completed:
            self._blocks[keys[i]].sliding = pages
        self._touch([key for key in keys if key in self._blocks])
        return len(placed.new) + len(placed.completed)

    # -- inside -----------------------------------------------------------------------------------
    def _place(self, tokens: Sequence[int], keys: list[bytes], salt: bytes, need_sliding: set[int]) -> _Placed:
        """Pages for the blocks to add and the sliding parts to complete, in chain order, as far as
        room can be made for them (the least recently used others evicted); nothing is kept yet."""
        protected, placed = set(keys), _Placed()
        full_pages, sliding_pages, size = len(self.layout.full), len(self.layout.sliding), self.block_tokens
        for i, key in enumerate(keys):
            block = self._blocks.get(key)
            if block is None:
                wanted = full_pages + (sliding_pages if i in need_sliding else 0)
                if not self._make_room(wanted, protected):
                    break
                pages = self.pool.take(wanted)
                sliding = pages[full_pages:] if i in need_sliding else None
                ids = tuple(tokens[i * size : (i + 1) * size])
                placed.new.append((i, key, _Block(keys[i - 1] if i else salt, ids, pages[:full_pages], sliding)))
            elif i in need_sliding:
                if not self._make_room(sliding_pages, protected):
                    break
                placed.completed.append((i, self.pool.take(sliding_pages)))
        return placed

    def _copy_in(
        self, rows: KeyRows, row: int, layers: tuple[int, ...], blocks: list[tuple[int, tuple[int, ...]]]
    ) -> None:
        """Each of ``blocks`` (chain index, a page per layer of ``layers``) from ``row`` into its
        pages: one copy per layer for each run of consecutive blocks."""
        if not layers:
            return
        size = self.block_tokens
        for run in _runs(blocks):
            start, end = run[0][0] * size, (run[-1][0] + 1) * size
            for index, layer in enumerate(layers):
                kv = rows.read_keys(row, layer, start, end)
                if kv is None:
                    raise RuntimeError(f"row {row} holds no keys of layer {layer}")
                self.pool.write([pages[index] for _, pages in run], *kv)

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

    def _make_room(self, pages: int, protected: set[bytes]) -> bool:
        if pages > self.pool.pages:
            return False
        pins = self._counts.pins
        victims = iter([key for key in self._blocks if key not in pins and key not in protected])
        while self.pool.free_pages < pages:
            victim = next(victims, None)
            if victim is None:
                return False
            self.pool.give(self._blocks.pop(victim).pages)
            self._counts.evictions += 1
        return True


def _runs(blocks: list[tuple[int, tuple[int, ...]]]) -> list[list[tuple[int, tuple[int, ...]]]]:
    """``blocks`` (sorted by chain index) cut into runs of consecutive indices."""
    runs: list[list[tuple[int, tuple[int, ...]]]] = []
    for block in blocks:
        if runs and runs[-1][-1][0] + 1 == block[0]:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs

"""ResponseStore: finished responses by cache_key, least recently used out first, bounded by
entry count and by bytes. Plain state; the prompt cache actor is its only user."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class StoreStats:
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class ResponseStore(Generic[V]):
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("cache bounds must not be negative")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def count_hit(self) -> None:
        self.hits += 1

    def count_miss(self) -> None:
        self.misses += 1

    def put(self, key: str, value: V, size: int) -> bool:
        """Store (replacing any old value); False when one value alone is over a bound."""
        if size > self.max_bytes or self.max_entries == 0:
            return False
        self.discard(key)
        self._items[key] = (value, size)
        self._bytes += size
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            _, (_, evicted_size) = self._items.popitem(last=False)
            self._bytes -= evicted_size
            self.evictions += 1
        return True

    def discard(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[1]

    def keys(self) -> list[str]:
        return list(self._items)

    def stats(self) -> StoreStats:
        return StoreStats(
            len(self._items), self._bytes, self.max_entries, self.max_bytes, self.hits, self.misses, self.evictions
        )

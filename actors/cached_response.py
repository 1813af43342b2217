"""CachedResponse: a finished deterministic answer as the prompt cache keeps it (its tokens and its
end), and what it weighs in memory, which --cache-max-mb bounds. Shared by the prompt cache actor,
its Redis tier and the JSON codec of that tier."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from actors.messages import StreamDone, StreamToken

STORED_REASONS = ("stop", "length")


@dataclass(frozen=True, slots=True)
class CachedResponse:
    tokens: tuple[StreamToken, ...]
    done: StreamDone

    def size(self) -> int:
        """The bytes it holds in memory (its objects and their strings, each counted once),
        which the store's --cache-max-mb bounds."""
        logprobs = (part for token in self.tokens for part in _logprob_objects(token))
        return held_bytes((self, self.tokens, *self.tokens, *(t.text for t in self.tokens), *logprobs, self.done))


def _logprob_objects(token: StreamToken) -> Iterator[object]:
    """What a token's logprobs hold (twenty alternatives each can outweigh the token itself)."""
    if token.logprobs is None and not token.text_logprobs:
        return
    yield token.text_logprobs
    for shown in (token.logprobs, *token.text_logprobs):
        if shown is not None:
            yield from (shown, shown.top)
            for entry in (shown.chosen, *shown.top):
                yield from (entry, entry.token, entry.bytes)


def held_bytes(objects: Iterable[object]) -> int:
    seen: set[int] = set()
    total = 0
    for item in objects:
        if id(item) not in seen:
            seen.add(id(item))
            total += sys.getsizeof(item)
    return total

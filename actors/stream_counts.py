"""StreamCounts: the open generation streams, in all and per tenant, and the bounds on both.

--max-streams bounds the server; --max-streams-per-key bounds one tenant (an API key, or every
unkeyed caller together as one), so that a tenant that opens streams and never reads them holds
its own share and no more: the others still get theirs. Plain state, owned by the pipeline,
which opens streams (a refusal is raised before any work starts) and closes them.
"""

from __future__ import annotations

from collections import Counter


class TooManyStreams(RuntimeError):
    """A bound on open streams is reached: the request is refused (429) before any work starts."""


class StreamCounts:
    def __init__(self, max_streams: int, max_per_tenant: int) -> None:
        self.max_streams = max_streams
        self.max_per_tenant = max_per_tenant
        self.total = 0
        self._by_tenant: Counter[str | None] = Counter()

    def check(self, tenant: str | None) -> None:
        """TooManyStreams if one more stream of ``tenant`` (None: unkeyed) is past a bound."""
        if self.total >= self.max_streams:
            raise TooManyStreams(f"{self.total} streams are open, the most this server keeps (--max-streams)")
        if self._by_tenant[tenant] >= self.max_per_tenant:
            raise TooManyStreams(
                f"this API key has {self._by_tenant[tenant]} streams open, the most one key may hold "
                "(--max-streams-per-key): read or close one first"
            )

    def open(self, tenant: str | None) -> None:
        self.check(tenant)
        self.total += 1
        self._by_tenant[tenant] += 1

    def close(self, tenant: str | None) -> None:
        self.total -= 1
        self._by_tenant[tenant] -= 1
        if self._by_tenant[tenant] <= 0:
            del self._by_tenant[tenant]  # a tenant with nothing open holds no entry

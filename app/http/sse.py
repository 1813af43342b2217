"""Server-sent events framing."""

from __future__ import annotations

import json
from typing import Any


def sse_event(name: str | None, data: Any) -> bytes:
    """One event; ``data`` is JSON-encoded on a single line (every data line is one JSON object)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {payload}\n\n".encode()


def sse_comment(text: str = "") -> bytes:
    """A comment line: clients ignore it, proxies see traffic (keeps idle streams open)."""
    return f": {text}\n\n".encode()


SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}

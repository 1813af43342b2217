"""Server-sent events framing."""

from __future__ import annotations

import json
from typing import Any

# Line breaks to str.splitlines() but not to SSE: clients that read a stream with it (httpx's
# aiter_lines, so LiteLLM and many scripts) would cut an event where the model wrote one. JSON
# allows them raw only inside strings, where their escapes mean the same.
_UNICODE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(name: str | None, data: Any) -> bytes:
    """One event; ``data`` is JSON-encoded on a single line (every data line is one JSON object),
    a line by every client's reckoning."""
    if isinstance(data, str):
        payload = data
    else:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(_UNICODE_LINE_BREAKS)
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

"""A JSON response body, the same on every endpoint.

Non-ASCII characters go out as UTF-8, not as ``\\u`` escapes: JSON is UTF-8 (RFC 8259), it is
what OpenAI's API sends, and it is how the SSE events (app/http/sse.py) carry the same text, so
a stream and its non-streamed answer spell a word alike.
"""

from __future__ import annotations

import json
from typing import Any

from quart import Response


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(data, ensure_ascii=False), status=status, content_type="application/json", headers=headers
    )

"""Errors as HTTP responses: a status and OpenAI's error JSON shape, on every endpoint."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from quart import Response

from app.http.json_response import json_response

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """Raised anywhere in a handler; turned into an error response by the app's handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``code`` is a string or null, never a number (clients match on it)."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(error: ApiError) -> Response:
    response = json_response(error.body(), error.status)
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def from_validation_error(error: ValidationError) -> ApiError:
    """400 naming the first failing field and its rule (all of them are listed in the message).

    OpenAI, vLLM and the clients built for them expect 400 for a value they refuse (the openai
    client raises BadRequestError), never FastAPI's 422."""
    problems = []
    first_param: str | None = None
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "body"
        first_param = first_param or location
        problems.append(f"{location}: {item['msg']}")
    return ApiError(400, "; ".join(problems), param=first_param, code="invalid_value")

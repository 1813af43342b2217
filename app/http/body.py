"""Reading a JSON request body into a pydantic model, with clear errors for each way it fails."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from quart import request

from app.http.errors import ApiError, from_validation_error

M = TypeVar("M", bound=BaseModel)


async def parse_body(model: type[M]) -> M:
    raw = await request.get_data(cache=False)  # over MAX_CONTENT_LENGTH: Quart raises 413
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ApiError(422, f"the request body must be a JSON object, not {type(data).__name__}", param="body")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise from_validation_error(error) from error

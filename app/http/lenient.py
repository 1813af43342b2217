"""The base of every request body: OpenAI's reading of unknown fields and explicit nulls."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class Lenient(BaseModel):
    """Unknown fields are tolerated and an explicit null means the field's default, as OpenAI's
    API reads them (clients send ``"stream": null``)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

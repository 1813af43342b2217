"""Structured-output fields of a request: OpenAI's ``response_format``, vLLM's
``structured_outputs`` and its older ``guided_*`` fields, read into one GrammarSpec.

Only the shape is checked here; whether the grammar compiles is the engine's to say (a 400 too,
in app.http.jobs, before any work starts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.contract.grammar import GrammarSpec
from app.http.lenient import Lenient

MAX_CHOICES = 256
MAX_CHOICE_LENGTH = 1024
MAX_REGEX_LENGTH = 4096


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    strict: bool | None = None  # the output always follows the schema here, strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a json_schema response_format needs its 'json_schema'")
        return self


Choices = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_LENGTH)]],
    Field(min_length=1, max_length=MAX_CHOICES),
]
Regex = Annotated[str, Field(min_length=1, max_length=MAX_REGEX_LENGTH)]


class StructuredOutputs(Lenient):
    """vLLM's ``structured_outputs``: exactly one of json, regex, choice, json_object."""

    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: Regex | None = None
    choice: Choices | None = None
    json_object: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json_", "regex", "choice") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, json_object")
        return self


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """What a request constrains its output to, and where it said so (the 400's ``param``)."""

    grammar: GrammarSpec
    param: str
    schema_name: str | None = None  # json_schema: told to a Harmony model in its developer message
    schema_description: str | None = None


def _schema_source(schema: dict[str, Any] | bool | str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError:
            raise ValueError("the JSON schema is not valid JSON") from None
    # Canonical: the same schema gives the same cache key and the same compiled grammar.
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class StructuredFields(Lenient):
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None  # vLLM's older spellings
    guided_regex: Regex | None = None
    guided_choice: Choices | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredFields:
        given = [
            name
            for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice")
            if getattr(self, name) is not None
        ]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"give one way to constrain the output, not {' and '.join(given)}")
        return self

    def output_constraint(self, final_channel_only: bool) -> OutputConstraint | None:
        """The request's constraint, if any; ``final_channel_only`` for a Harmony conversation."""
        try:
            return self._constraint(final_channel_only)
        except ValueError as error:
            raise ConstraintError(str(error), self._param()) from None

    def _param(self) -> str:
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        for name in ("structured_outputs", "guided_json", "guided_regex", "guided_choice"):
            if getattr(self, name) is not None:
                return name
        return "response_format"

    def _constraint(self, final: bool) -> OutputConstraint | None:
        param = self._param()
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return OutputConstraint(GrammarSpec("json_object", "", final), param)
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            spec = GrammarSpec("json_schema", _schema_source(fmt.json_schema.schema_), final)
            return OutputConstraint(spec, param, fmt.json_schema.name, fmt.json_schema.description)
        outputs = self.structured_outputs
        schema = outputs.json_ if outputs is not None else self.guided_json
        regex = outputs.regex if outputs is not None else self.guided_regex
        choice = outputs.choice if outputs is not None else self.guided_choice
        if schema is not None:
            return OutputConstraint(GrammarSpec("json_schema", _schema_source(schema), final), param, "response")
        if regex is not None:
            return OutputConstraint(GrammarSpec("regex", regex, final), param)
        if choice is not None:
            return OutputConstraint(GrammarSpec("choice", json.dumps(choice, ensure_ascii=False), final), param)
        if outputs is not None and outputs.json_object:
            return OutputConstraint(GrammarSpec("json_object", "", final), param)
        return None


class ConstraintError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param

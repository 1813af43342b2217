"""Tool calling's request fields on /v1/chat/completions: ``tools``, ``tool_choice``,
``parallel_tool_calls``, and the messages that carry calls and their results back in.

Only the shape is checked here (a 400 naming the field, never a 422); what the model is told
and how its calls are read are app.prompts.builder's and app.text.harmony_text's.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.http.lenient import Lenient
from app.prompts.builder import ToolSpec

# OpenAI's rule for a function's name; it also keeps Harmony's "functions.NAME" recipient unambiguous.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
MAX_TOOLS = 128  # OpenAI's bound


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes no arguments
    strict: bool | None = None  # a forced call always follows the schema here, strict or not


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


ToolChoiceMode = Literal["none", "auto", "required"]
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def canonical_schema(schema: dict[str, Any] | None) -> str:
    """The parameters schema as canonical JSON: the same tools give the same prompt and grammar."""
    return json.dumps(NO_ARGUMENTS if schema is None else schema, sort_keys=True, separators=(",", ":"))


def check_tool_names(names: Sequence[str]) -> None:
    """``tools``' names are unique: a call names the function it means (chat's and Responses')."""
    if duplicated := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"two tools are named {duplicated[0]!r}")


def check_tool_choice(named: str | None, required: bool, names: Collection[str]) -> None:
    """A ``tool_choice`` that names a function names one of ``tools``; ``required`` needs one."""
    if named is not None:
        if named not in names:
            raise ValueError(f"tool_choice names {named!r}, which is not in tools")
    elif required and not names:
        raise ValueError("tool_choice 'required' needs tools")


@dataclass(frozen=True, slots=True)
class ToolUse:
    """What a request offers and demands: the tools the model is told of (none for ``none``), and
    the names a forced call must pick from (empty: the model may answer in words)."""

    tools: tuple[ToolSpec, ...]
    forced: tuple[str, ...]
    parallel: bool

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tools)

    @classmethod
    def of(cls, tools: tuple[ToolSpec, ...], choice: str | None, named: str | None, parallel: bool) -> ToolUse:
        """What chat's and /v1/responses' tool fields both say: ``choice`` is "auto", "none" or
        "required" (None: "auto"), ``named`` the function a named choice forces."""
        if not tools or (named is None and choice == "none"):
            return cls((), (), parallel)
        if named is not None:
            return cls(tools, (named,), parallel)
        return cls(tools, tuple(t.name for t in tools) if choice == "required" else (), parallel)


class ToolFields(Lenient):
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoiceMode | NamedToolChoice | None = None  # validated after tools, which it names
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        check_tool_names([tool.function.name for tool in value or ()])
        return value

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(
        cls, value: ToolChoiceMode | NamedToolChoice | None, info: ValidationInfo
    ) -> ToolChoiceMode | NamedToolChoice | None:
        tools: list[ToolDefinition] = info.data.get("tools") or []
        named = value.function.name if isinstance(value, NamedToolChoice) else None
        check_tool_choice(named, value == "required", {t.function.name for t in tools})
        return value

    def tool_use(self) -> ToolUse:
        tools = tuple(
            ToolSpec(t.function.name, t.function.description, canonical_schema(t.function.parameters))
            for t in self.tools or ()
        )
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return ToolUse.of(tools, None, choice.function.name, self.parallel_tool_calls)
        return ToolUse.of(tools, choice, None, self.parallel_tool_calls)


class InputFunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName
    arguments: str  # JSON text, as the model wrote it (OpenAI's shape)


class InputToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: InputFunctionCall

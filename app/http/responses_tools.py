"""``tools`` and ``tool_choice`` of POST /v1/responses: what the model is offered, what is forced.

Three kinds of tool are read:

- ``function`` tools (flat: ``name``, ``description``, ``parameters``, ``strict``), rendered in
  Harmony's ``functions`` namespace as on chat;
- ``namespace`` tools (``{"type": "namespace", "name", "description", "tools": [function tools]}``,
  as Codex CLI sends its multi-agent tools), each rendered as a Harmony namespace of its own; a call
  to one comes back as a ``function_call`` item with ``namespace`` beside ``name``, the shape
  Codex parses;
- hosted tools, which OpenAI runs on its side (web search, file search, a code interpreter, ...):
  this server cannot run them, so they are accepted, echoed, and never offered to the model. A
  ``tool_choice`` that forces one is a 400, as is any other tool type.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.http.tool_fields import (
    MAX_TOOLS,
    FunctionDefinition,
    FunctionName,
    ToolChoiceMode,
    ToolUse,
    canonical_schema,
    check_tool_choice,
    check_tool_names,
)
from app.prompts.builder import FUNCTIONS_NAMESPACE, ToolNamespace, ToolSpec

HostedType = Literal[
    "web_search",
    "web_search_2025_08_26",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "file_search",
    "code_interpreter",
    "computer",
    "computer_use",
    "computer_use_preview",
    "image_generation",
    "mcp",
    "tool_search",
    "programmatic_tool_calling",
    # Run by the client, but called through item types of their own that gpt-oss does not write.
    "local_shell",
    "shell",
    "apply_patch",
]
HOSTED_TOOLS = frozenset(get_args(HostedType))
KINDS = "function, namespace, or a hosted tool (accepted, not run)"


def _type_of(value: Any) -> str:
    return str(value.get("type"))[:40] if isinstance(value, dict) else type(value).__name__


class FunctionTool(FunctionDefinition):
    """A function the model may call, in the Responses shape: chat's function definition, flat
    beside ``type`` instead of nested under ``function``."""

    type: Literal["function"]


class NamespaceTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["namespace"]
    name: FunctionName
    description: str | None = None
    tools: Annotated[list[FunctionTool], Field(min_length=1, max_length=MAX_TOOLS)]

    @field_validator("name")
    @classmethod
    def _not_ours(cls, value: str) -> str:
        if value == FUNCTIONS_NAMESPACE:
            raise ValueError(f"a namespace cannot be named {FUNCTIONS_NAMESPACE!r}: it holds the plain function tools")
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _functions_only(cls, value: Any) -> Any:
        for tool in value if isinstance(value, list) else ():
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise ValueError(f"a namespace holds function tools only, not a {_type_of(tool)!r} tool")
        return value

    @field_validator("tools")
    @classmethod
    def _unique(cls, value: list[FunctionTool]) -> list[FunctionTool]:
        check_tool_names([tool.name for tool in value])
        return value


class HostedTool(BaseModel):
    """A tool OpenAI runs on its side; its fields are kept as given, for the echo."""

    model_config = ConfigDict(extra="allow")
    type: HostedType


ResponsesTool = Annotated[FunctionTool | NamespaceTool | HostedTool, Field(discriminator="type")]


def check_tool_types(value: Any) -> Any:
    """Before the tools are read: each names a kind this server knows, in words of ours."""
    for tool in value if isinstance(value, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "custom":
            raise ValueError("a 'custom' tool (free-form input) is not served here: offer a function tool")
        if kind not in ("function", "namespace") and kind not in HOSTED_TOOLS:
            raise ValueError(f"a {_type_of(tool)!r} tool is not a tool type this server knows ({KINDS})")
    return value


def check_tools(tools: list[ResponsesTool] | None) -> list[ResponsesTool] | None:
    """Names unique where calls would confuse them, and at most MAX_TOOLS functions in all."""
    check_tool_names([t.name for t in tools or () if isinstance(t, FunctionTool)])
    namespaces = [t.name for t in tools or () if isinstance(t, NamespaceTool)]
    if duplicated := sorted({name for name in namespaces if namespaces.count(name) > 1}):
        raise ValueError(f"two namespaces are named {duplicated[0]!r}")
    if len(specs(tools)) > MAX_TOOLS:
        raise ValueError(f"at most {MAX_TOOLS} functions in all, namespaces' included")
    return tools


def specs(tools: list[ResponsesTool] | None) -> tuple[ToolSpec, ...]:
    """The functions the model may be offered, in the request's order; hosted tools are not."""
    found: list[ToolSpec] = []
    for tool in tools or ():
        if isinstance(tool, FunctionTool):
            found.append(ToolSpec(tool.name, tool.description, canonical_schema(tool.parameters)))
        elif isinstance(tool, NamespaceTool):
            namespace = ToolNamespace(tool.name, tool.description)
            found += [ToolSpec(t.name, t.description, canonical_schema(t.parameters), namespace) for t in tool.tools]
    return tuple(found)


class NamedFunctionChoice(BaseModel):
    """``{"type": "function", "name": ...}``; with ``namespace``, a function of that namespace."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: FunctionName
    namespace: FunctionName | None = None

    @property
    def qualified(self) -> str:
        return self.name if self.namespace is None else f"{self.namespace}.{self.name}"


ToolChoice = ToolChoiceMode | NamedFunctionChoice


def check_choice_type(value: Any) -> Any:
    """Before tool_choice is read: a choice this server cannot honour, in words of ours."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in HOSTED_TOOLS:
        raise ValueError(f"tool_choice forces {str(kind)!r}, a hosted tool this server does not run")
    if kind == "custom":
        raise ValueError("tool_choice forces a custom tool, which is not served here")
    if kind == "allowed_tools":
        raise ValueError("tool_choice 'allowed_tools' is not served yet: list the allowed tools in tools")
    if isinstance(value, dict) and kind != "function":
        raise ValueError(f"tool_choice of type {_type_of(value)!r} is not one this server knows")
    return value


def check_choice(value: ToolChoice | None, tools: list[ResponsesTool] | None) -> ToolChoice | None:
    """chat's rule (app.http.tool_fields), on the functions the model may be offered."""
    offered = {t.qualified for t in specs(tools)}
    if value == "required" and tools and not offered:
        raise ValueError("tool_choice 'required' needs function tools: hosted tools are not run here")
    named = value.qualified if isinstance(value, NamedFunctionChoice) else None
    check_tool_choice(named, value == "required", offered)
    return value


def tool_use(tools: list[ResponsesTool] | None, choice: ToolChoice | None, parallel: bool) -> ToolUse:
    """The same ToolUse chat's tool fields give: what the model is told of, what is forced."""
    if isinstance(choice, NamedFunctionChoice):
        return ToolUse.of(specs(tools), None, choice.qualified, parallel)
    return ToolUse.of(specs(tools), choice, None, parallel)


def _function_echo(tool: FunctionTool) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        "strict": bool(tool.strict),
    }


def echo_tools(tools: list[ResponsesTool] | None) -> list[dict[str, Any]]:
    """The tools as the response object repeats them (hosted ones as they were given)."""
    echoed: list[dict[str, Any]] = []
    for tool in tools or ():
        if isinstance(tool, FunctionTool):
            echoed.append(_function_echo(tool))
        elif isinstance(tool, NamespaceTool):
            functions = [_function_echo(t) for t in tool.tools]
            echoed.append({"type": "namespace", "name": tool.name, "description": tool.description, "tools": functions})
        else:
            echoed.append(tool.model_dump())
    return echoed


def echo_choice(choice: ToolChoice | None) -> str | dict[str, str]:
    if isinstance(choice, NamedFunctionChoice):
        named = {"type": "function", "name": choice.name}
        return named if choice.namespace is None else named | {"namespace": choice.namespace}
    return choice or "auto"

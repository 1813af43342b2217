"""The body of POST /v1/responses, validated: OpenAI's Responses fields that this server serves.

``input`` is a string or a list of items: messages (``type`` may be left out, as OpenAI allows;
content a string or ``input_text`` / ``output_text`` parts), ``reasoning`` items, and a tool
round trip's ``function_call`` / ``function_call_output`` items. ``tools`` (function tools in the
Responses shape), ``tool_choice`` and ``parallel_tool_calls`` map onto chat's machinery
(app.http.tool_fields' ToolUse): the same prompt, the same guaranteed call grammar, the same 400s.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from app.contract.sampling import SamplingDefaults
from app.http.schemas import NOT_TEXT_PARTS, SamplingFields
from app.http.structured import JsonSchemaFormat, ResponseFormat, StructuredFields
from app.http.tool_fields import (
    MAX_TOOLS,
    FunctionDefinition,
    FunctionName,
    NamedFunction,
    ToolChoiceMode,
    ToolUse,
    canonical_schema,
    check_tool_choice,
    check_tool_names,
)
from app.prompts.builder import DEFAULT_CONVERSATION_DATE, ChatMessage, ToolCall, ToolSpec

RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")
NOT_FUNCTION_TOOLS = "only function tools are served here (type 'function')"
TOOL_ITEMS = frozenset(  # items of OpenAI's built-in tools, which this server does not run
    {
        "custom_tool_call",
        "custom_tool_call_output",
        "file_search_call",
        "web_search_call",
        "computer_call",
        "computer_call_output",
        "code_interpreter_call",
        "local_shell_call",
        "local_shell_call_output",
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "image_generation_call",
    }
)
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
MAX_METADATA_KEYS = 16  # OpenAI's bounds on metadata
Item = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="ignore")
    effort: Literal["low", "medium", "high"] | None = None  # "minimal" is not a Harmony effort


class TextFormat(BaseModel):
    """Responses' ``text.format``: the schema's fields sit beside ``type``, not under json_schema."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Annotated[str, Field(min_length=1, max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat | None = None


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in NOT_TEXT_PARTS:
            raise ValueError(f"this model accepts text only: a {kind!r} part cannot be read")
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            continue
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: a content part must be input_text or output_text with its text")
        texts.append(part["text"])
    return "".join(texts)


def normalize_item(raw: Any, where: str) -> Item:
    """One input item in the shape it is stored and listed in (with an id of ours if it had none)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    kind = raw.get("type", "message" if "role" in raw else None)
    if kind in TOOL_ITEMS:
        raise ValueError(f"{where}: a {kind!r} item: {NOT_FUNCTION_TOOLS}")
    if kind == "function_call":
        try:
            call = InputFunctionCall.model_validate(raw)
        except ValidationError:
            needs = "call_id, name (a function's) and arguments (text)"
            raise ValueError(f"{where}: a function_call item needs {needs}") from None
        return {
            "id": _item_id(raw.get("id"), "fc"),
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
            "status": "completed",
        }
    if kind == "function_call_output":
        try:
            result = InputFunctionCallOutput.model_validate(raw)
        except ValidationError:
            raise ValueError(f"{where}: a function_call_output item needs call_id and output (text)") from None
        output = result.output if isinstance(result.output, str) else _text_of(result.output, where)
        return {
            "id": _item_id(raw.get("id"), "fco"),
            "type": "function_call_output",
            "call_id": result.call_id,
            "output": output,
            "status": "completed",
        }
    if kind == "message":
        role = raw.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise ValueError(f"{where}: role must be user, system, developer or assistant")
        text = _text_of(raw.get("content", ""), where)
        part_type = "output_text" if role == "assistant" else "input_text"
        part: Item = {"type": part_type, "text": text}
        if role == "assistant":
            part["annotations"] = []
        return {
            "id": _item_id(raw.get("id"), "msg"),
            "type": "message",
            "role": role,
            "status": "completed",
            "content": [part],
        }
    if kind == "reasoning":
        content = raw.get("content") or []
        if not isinstance(content, list) or not all(
            isinstance(p, dict) and p.get("type") == "reasoning_text" and isinstance(p.get("text"), str)
            for p in content
        ):
            raise ValueError(f"{where}: a reasoning item's content is a list of reasoning_text parts")
        summary = raw.get("summary") or []
        return {
            "id": _item_id(raw.get("id"), "rs"),
            "type": "reasoning",
            "summary": summary if isinstance(summary, list) else [],
            "content": [{"type": "reasoning_text", "text": p["text"]} for p in content],
        }
    raise ValueError(f"{where}: items of type {kind!r} are not served here (message or reasoning)")


CallId = Annotated[str, Field(min_length=1, max_length=256)]


class InputFunctionCall(BaseModel):
    """A call the model made, sent back in (OpenAI's ``function_call`` item)."""

    model_config = ConfigDict(extra="ignore")
    call_id: CallId
    name: FunctionName
    arguments: str  # JSON text, as the model wrote it


class InputFunctionCallOutput(BaseModel):
    """A tool's result for an earlier call (``function_call_output``)."""

    model_config = ConfigDict(extra="ignore")
    call_id: CallId
    output: str | list[Any]


def _item_id(given: Any, prefix: str) -> str:
    """A client's item id is kept for display when it is a plain short token; else one of ours."""
    if isinstance(given, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,128}", given):
        return given
    return new_id(prefix)


def chat_messages(items: list[Item]) -> tuple[ChatMessage, ...]:
    """The conversation as prompt messages. A reasoning item goes with the assistant message that
    follows it; the prompt builder keeps it only while that message's calls are pending (Harmony
    drops a finished turn's reasoning; models without Harmony have none).
    Consecutive ``function_call`` items are one assistant message's calls; a ``function_call_output``
    is the tool's message, named by its call. ValueError: an output that answers no earlier call."""
    messages: list[ChatMessage] = []
    called: dict[str, str] = {}  # call_id -> function name
    calls: list[ToolCall] = []  # the assistant message being gathered from function_call items
    reasoning: list[str] = []  # reasoning items since the last assistant message

    def flush() -> None:
        if calls:
            messages.append(ChatMessage("assistant", "", tuple(calls), reasoning="".join(reasoning)))
            calls.clear()
            reasoning.clear()

    for item in items:
        kind = item.get("type")
        if kind == "function_call":
            calls.append(ToolCall(item["call_id"], item["name"], item["arguments"]))
            called[item["call_id"]] = item["name"]
            continue
        if kind == "reasoning":
            flush()  # reasoning after calls starts the next assistant message
            reasoning.extend(part["text"] for part in item.get("content", []))
            continue
        if kind not in ("message", "function_call_output"):
            continue
        flush()
        if kind == "message":
            text = "".join(part.get("text", "") for part in item.get("content", []))
            said = "".join(reasoning) if item["role"] == "assistant" else ""
            messages.append(ChatMessage(item["role"], text, reasoning=said))
            reasoning.clear()
        elif item["call_id"] not in called:
            shown = item["call_id"][:64]
            raise ValueError(f"a function_call_output's call_id {shown!r} answers no earlier function_call")
        else:
            call_id = item["call_id"]
            messages.append(ChatMessage("tool", item["output"], (), called[call_id], call_id))
    flush()
    return tuple(messages)


class FunctionTool(FunctionDefinition):
    """A function the model may call, in the Responses shape: chat's function definition, flat
    beside ``type`` instead of nested under ``function``."""

    type: Literal["function"]


class NamedFunctionChoice(NamedFunction):
    type: Literal["function"]


class ResponsesRequest(SamplingFields):
    """POST /v1/responses."""

    model: str | None = None
    input: str | list[Item]
    instructions: str | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    text: TextConfig | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoiceMode | NamedFunctionChoice | None = None  # validated after tools, which it names
    parallel_tool_calls: bool = True
    conversation_date: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")] = DEFAULT_CONVERSATION_DATE
    cache: bool = True  # false: never served from (or stored in) the prompt cache

    @field_validator("input")
    @classmethod
    def _items(cls, value: str | list[Item]) -> str | list[Item]:
        if isinstance(value, list):
            if not value:
                raise ValueError("input must hold at least one item")
            return [normalize_item(item, f"input[{i}]") for i, item in enumerate(value)]
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        for tool in value if isinstance(value, list) else ():
            if isinstance(tool, dict) and tool.get("type") != "function":
                raise ValueError(f"a {str(tool.get('type'))[:40]!r} tool: {NOT_FUNCTION_TOOLS}")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[FunctionTool] | None) -> list[FunctionTool] | None:
        check_tool_names([tool.name for tool in value or ()])
        return value

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(
        cls, value: ToolChoiceMode | NamedFunctionChoice | None, info: ValidationInfo
    ) -> ToolChoiceMode | NamedFunctionChoice | None:
        tools: list[FunctionTool] = info.data.get("tools") or []
        named = value.name if isinstance(value, NamedFunctionChoice) else None
        check_tool_choice(named, value == "required", {t.name for t in tools})
        return value

    def tool_use(self) -> ToolUse:
        """The same ToolUse chat's tool fields give: what the model is told of, what is forced."""
        tools = tuple(ToolSpec(t.name, t.description, canonical_schema(t.parameters)) for t in self.tools or ())
        choice = self.tool_choice
        if isinstance(choice, NamedFunctionChoice):
            return ToolUse.of(tools, None, choice.name, self.parallel_tool_calls)
        return ToolUse.of(tools, choice, None, self.parallel_tool_calls)

    @field_validator("metadata")
    @classmethod
    def _few_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} metadata keys")
        return value

    @field_validator("previous_response_id")
    @classmethod
    def _our_id(cls, value: str | None) -> str | None:
        if value is not None and not RESPONSE_ID.fullmatch(value):
            raise ValueError("previous_response_id must be a response id this server gave (resp_ and 32 hex digits)")
        return value

    def input_items(self) -> list[Item]:
        if isinstance(self.input, str):
            return [normalize_item({"role": "user", "content": self.input}, "input")]
        return list(self.input)

    def sampling(self) -> SamplingFields:
        """The sampling fields, max_output_tokens read as max_tokens."""
        if self.max_output_tokens is None:
            return self
        return self.model_copy(update={"max_tokens": self.max_output_tokens})

    def structured(self) -> StructuredFields | None:
        """text.format as the structured-output path reads it (response_format)."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredFields(response_format=ResponseFormat(type="json_object"))
        if fmt.schema_ is None:
            raise ValueError("a json_schema text.format needs its 'schema'")
        schema = JsonSchemaFormat(name=fmt.name, description=fmt.description, schema=fmt.schema_, strict=fmt.strict)
        return StructuredFields(response_format=ResponseFormat(type="json_schema", json_schema=schema))

    def _choice_echo(self) -> str | dict[str, str]:
        if isinstance(self.tool_choice, NamedFunctionChoice):
            return {"type": "function", "name": self.tool_choice.name}
        return self.tool_choice or "auto"

    def echo(self, defaults: SamplingDefaults) -> dict[str, Any]:
        """The request's fields that the response object repeats (the sampling it got: its own
        values, else the model's ``defaults``)."""
        fmt = self.text.format if self.text is not None and self.text.format is not None else TextFormat()
        text_format: dict[str, Any] = {"type": fmt.type}
        if fmt.type == "json_schema":
            text_format |= {"name": fmt.name, "schema": fmt.schema_, "strict": bool(fmt.strict)}
            if fmt.description is not None:
                text_format["description"] = fmt.description
        return {
            "instructions": self.instructions,
            "metadata": self.metadata or {},
            "previous_response_id": self.previous_response_id,
            "max_output_tokens": self.max_output_tokens,
            "temperature": defaults.pick("temperature", self.temperature),
            "top_p": defaults.pick("top_p", self.top_p),
            "reasoning": {"effort": self.reasoning.effort if self.reasoning else None, "summary": None},
            "text": {"format": text_format},
            "store": self.store,
            "tools": [
                {
                    "type": "function",
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                    "strict": bool(t.strict),
                }
                for t in self.tools or ()
            ],
            "tool_choice": self._choice_echo(),
            "parallel_tool_calls": self.parallel_tool_calls,
            "truncation": "disabled",
        }

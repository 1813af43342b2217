"""Request bodies, validated by pydantic: wrong types and out-of-range values become 400s that name
the field. Unknown fields are tolerated (clients send many), as OpenAI-compatible servers do."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from app.http.lenient import Lenient
from app.http.prompt_forms import prompt_forms, prompt_list
from app.http.structured import StructuredFields
from app.http.tool_fields import InputToolCall, ToolFields
from app.prompts.builder import DEFAULT_CONVERSATION_DATE, ChatMessage, PromptSpec, ToolCall

MAX_STOP_STRINGS = 8
# A stop string is held back from the client until it cannot be a stop string's start: a long one
# would hold back the whole answer.
MAX_STOP_LENGTH = 256
# OpenAI takes any int64 seed; a per-request generator takes it modulo 2**64.
INT64 = 2**63
# OpenAI's bound on alternatives per token (chat's top_logprobs, the legacy logprobs). Strict: a
# bool or a float is refused, not read as a count.
MAX_LOGPROBS = 20
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS, strict=True)]


# Parts OpenAI's API takes that carry something other than text.
NOT_TEXT_PARTS = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file"})
MAX_LOGIT_BIAS = 1024  # entries; OpenAI's own bound is 300
MAX_CHOICES_PER_PROMPT = 16  # n
# The sampler compares top_p in float32: a smaller positive value is zero there and keeps no token
# (5e-324 was a 500). The smallest normal float32, 2**-126 (about 1.2e-38).
MIN_TOP_P = 2.0**-126
# vLLM's cache_salt: a string that isolates a request's prefix KV cache (per end user, say); any
# text up to this long. Strict: a number or an object is refused, not read as a string.
MAX_CACHE_SALT = 256


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[InputToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this result answers
    # assistant: the reasoning that led to it, as this server returns it (``reasoning``, and
    # ``reasoning_content`` as older clients send it back)
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        """An image, audio or file part is one clear refusal, not a union's error list."""
        content = data.get("content") if isinstance(data, dict) else None
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in NOT_TEXT_PARTS:
                    raise ValueError(f"this model accepts text only: a {kind!r} part cannot be read")
        return data

    def to_chat(self, called: dict[str, str] | None = None) -> ChatMessage:
        """``called``: call id -> function name, of the calls made before this message."""
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(part.text for part in self.content)
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        name = (called or {}).get(self.tool_call_id or "") if self.role == "tool" else None
        reasoning = (self.reasoning or self.reasoning_content or "") if self.role == "assistant" else ""
        return ChatMessage(self.role, text, calls, name, self.tool_call_id if self.role == "tool" else None, reasoning)


def chat_messages(messages: list[InputMessage]) -> tuple[ChatMessage, ...]:
    """The messages for the prompt builder; a tool result learns its function from its call."""
    called: dict[str, str] = {}
    out = []
    for message in messages:
        out.append(message.to_chat(called))
        called.update((c.id, c.function.name) for c in message.tool_calls or ())
    return tuple(out)


def _calls_answered(value: list[InputMessage] | None) -> list[InputMessage] | None:
    """Each tool message answers a call an earlier assistant message made; only assistants call."""
    called: set[str] = set()
    for i, message in enumerate(value or ()):
        if message.tool_calls and message.role != "assistant":
            raise ValueError(f"message {i}: only an assistant message carries tool_calls")
        if message.role == "tool":
            if message.tool_call_id is None:
                raise ValueError(f"message {i}: a tool message needs its tool_call_id")
            if message.tool_call_id not in called:
                shown = message.tool_call_id[:64]
                raise ValueError(f"message {i}: tool_call_id {shown!r} answers no earlier tool call")
        called.update(c.id for c in message.tool_calls or ())
    return value


class SamplingFields(Lenient):
    """What every generation endpoint takes; the names and ranges follow OpenAI and vLLM."""

    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None  # vLLM's; 0: off
    seed: Annotated[int, Field(ge=-INT64, lt=INT64)] | None = None
    stop: str | list[str] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # seconds; past it the request ends
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] | None = None
    # vLLM's extension; below 0.01 the penalised logits overflow to infinity.
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0, allow_inf_nan=False)] | None = None
    # vLLM's: mixed into the first block's key of the prefix KV cache, beside the API key's tenant.
    cache_salt: Annotated[str, Field(min_length=1, max_length=MAX_CACHE_SALT, strict=True)] | None = None
    # OpenAI's: token id (a string, as JSON keys are) -> a bias of -100..100 added to its logit.
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = None

    @field_validator("top_p")
    @classmethod
    def _top_p_above_zero_in_float32(cls, value: float | None) -> float | None:
        if value is not None and value < MIN_TOP_P:
            raise ValueError(f"top_p must be at least {MIN_TOP_P:.2g} (smaller is zero to the sampler)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries")
        for key in value:
            if not key.isascii() or not key.isdigit() or len(key) > 12:
                raise ValueError(f"logit_bias keys are token ids, not {key[:20]!r}")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops) and isinstance(value, list):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"a stop string may be at most {MAX_STOP_LENGTH} characters")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_logprobs(self) -> int | None:
        """Alternatives per token for SamplingParams.logprobs (None: no logprobs). Each endpoint
        has its own fields for it (chat: logprobs + top_logprobs; completions, /generate: logprobs)."""
        return None


class PromptFields(Lenient):
    """What shapes the prompt besides the messages, and whether the prompt cache may serve it."""

    reasoning_effort: Literal["low", "medium", "high"] | None = None
    # gpt-oss's system message states a date; it is part of the prompt, so it is explicit.
    conversation_date: Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")] = DEFAULT_CONVERSATION_DATE
    instructions: str | None = None  # extra developer instructions, before any in the messages
    cache: bool = True  # false: never served from (or stored in) the prompt cache

    def prompt_spec(self, messages: list[InputMessage] | None, prompt: str | None) -> PromptSpec:
        return PromptSpec(
            messages=chat_messages(messages) if messages else None,
            prompt=prompt,
            reasoning_effort=self.reasoning_effort or "medium",
            conversation_date=self.conversation_date,
            instructions=self.instructions,
        )


def _at_least_one(value: list[InputMessage] | None) -> list[InputMessage] | None:
    if value is not None and not value:
        raise ValueError("messages must hold at least one message")
    return value


class GenerateRequest(SamplingFields, PromptFields, StructuredFields):
    """POST /generate: messages or a raw prompt; streams named SSE events unless stream is false."""

    messages: list[InputMessage] | None = None
    prompt: str | None = None
    stream: bool = True
    model: str | None = None
    logprobs: LogprobCount | None = None  # each token event carries its logprob and this many alternatives

    _some_messages = field_validator("messages")(_at_least_one)
    _answered = field_validator("messages")(_calls_answered)

    def requested_logprobs(self) -> int | None:
        return self.logprobs


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage on every chunk (vLLM's extension)


class OpenAIFields(Lenient):
    """Fields of OpenAI's API that this server accepts only at their neutral values."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES_PER_PROMPT)] | None = None  # choices per prompt
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(SamplingFields, PromptFields, StructuredFields, ToolFields, OpenAIFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[InputMessage], Field(min_length=1)]

    _answered = field_validator("messages")(_calls_answered)

    def prompt_spec(self, messages: list[InputMessage] | None, prompt: str | None) -> PromptSpec:
        return dataclasses.replace(super().prompt_spec(messages, prompt), tools=self.tool_use().tools)

    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: LogprobCount | None = None  # validated after logprobs, which it needs

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")  # as OpenAI answers
        return value

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def effective_max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(SamplingFields, PromptFields, StructuredFields, OpenAIFields):
    """POST /v1/completions: raw prompts, as OpenAI takes them (text or token ids, one or a list)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    tools: list[dict[str, Any]] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for this endpoint
    echo: bool = False
    suffix: str | None = None
    logprobs: LogprobCount | None = None  # the legacy field: alternatives per token (0: the chosen only)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_forms(cls, value: object) -> object:
        return prompt_forms(value)  # before pydantic's union check (see app/http/prompt_forms.py)

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError("tool calling is on /v1/chat/completions only")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | tuple[int, ...]]:
        """Each prompt: a text, or token ids."""
        return prompt_list(self.prompt)

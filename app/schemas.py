"""Request bodies, validated by pydantic: wrong types and out-of-range values become 422s that name
the field. Unknown fields are tolerated (clients send many), as OpenAI-compatible servers do."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.prompts.builder import ChatMessage

MAX_STOP_STRINGS = 8


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def to_chat(self) -> ChatMessage:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(part.text for part in self.content)
        return ChatMessage(self.role, text)


class SamplingFields(BaseModel):
    """What every generation endpoint takes; the names and ranges follow OpenAI and vLLM."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # 0 or -1: off
    seed: int | None = None
    stop: str | list[str] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    timeout: Annotated[float, Field(gt=0)] | None = None  # seconds; past it the request ends

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list):
            if len(value) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
            if any(not s for s in value):
                raise ValueError("stop strings must not be empty")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class GenerateRequest(SamplingFields):
    """POST /generate: messages or a raw prompt; streams named SSE events unless stream is false."""

    messages: list[InputMessage] | None = None
    prompt: str | None = None
    stream: bool = True
    model: str | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value: list[InputMessage] | None) -> list[InputMessage] | None:
        if value is not None and not value:
            raise ValueError("messages must hold at least one message")
        return value

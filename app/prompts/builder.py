"""PromptBuilder: a request's messages (or raw prompt) to the model's prompt tokens. Pure.

gpt-oss gets the Harmony format rendered by openai-harmony itself; other models get their own
chat template. Nothing implicit goes in: the date in gpt-oss's system message is an explicit
field with a fixed default, so the same request gives the same tokens on every day.
``PROMPT_VERSION`` names these rules: change it whenever the rendering changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

PROMPT_VERSION = "pb-1"
DEFAULT_CONVERSATION_DATE = "2025-06-28"
ReasoningEffort = Literal["low", "medium", "high"]
Role = Literal["system", "developer", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """Everything that decides the prompt tokens, and nothing else."""

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None  # raw text: tokenised as is, no template
    reasoning_effort: ReasoningEffort = "medium"
    conversation_date: str = DEFAULT_CONVERSATION_DATE
    instructions: str | None = None  # extra developer instructions (OpenAI "instructions")


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: object) -> object: ...

    def encode(self, text: str, **kwargs: object) -> list[int]: ...


class PromptError(ValueError):
    """The request cannot be rendered as a prompt for this model."""


def build_prompt_tokens(spec: PromptSpec, tokenizer: ChatTokenizer, harmony: bool) -> tuple[int, ...]:
    if spec.prompt is not None:
        tokens = _encode_raw(spec.prompt, tokenizer, harmony)
    elif spec.messages:
        tokens = _render_harmony(spec) if harmony else _render_template(spec, tokenizer)
    else:
        raise PromptError("give either messages or prompt")
    if not tokens:
        raise PromptError("the prompt is empty")
    return tuple(tokens)


def _encode_raw(text: str, tokenizer: ChatTokenizer, harmony: bool) -> list[int]:
    if harmony:
        from app.prompts.harmony_encoding import harmony_encoding

        # A raw completion prompt may spell Harmony's special tokens on purpose.
        return list(harmony_encoding().encode(text, allowed_special="all"))
    return list(tokenizer.encode(text))


def _render_template(spec: PromptSpec, tokenizer: ChatTokenizer) -> list[int]:
    messages = [
        {"role": m.role if m.role != "developer" else "system", "content": m.content} for m in spec.messages or ()
    ]
    if spec.instructions:
        messages.insert(0, {"role": "system", "content": spec.instructions})
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptError("this model has no chat template: send a raw prompt instead of messages")
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(rendered, dict):  # some tokenizers return a BatchEncoding whatever is asked
        rendered = rendered["input_ids"]
    return list(rendered)  # type: ignore[call-overload]


def _render_harmony(spec: PromptSpec) -> list[int]:
    import openai_harmony as oh

    from app.prompts.harmony_encoding import harmony_encoding

    effort = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM, "high": oh.ReasoningEffort.HIGH}
    system = (
        oh.SystemContent.new()
        .with_reasoning_effort(effort[spec.reasoning_effort])
        .with_conversation_start_date(spec.conversation_date)
    )
    conversation: list[oh.Message] = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    # The request's system and developer messages are the developer's instructions in Harmony;
    # the Harmony system message is the model's own (identity, date, reasoning effort).
    instructions = [m.content for m in spec.messages or () if m.role in ("system", "developer")]
    if spec.instructions:
        instructions.insert(0, spec.instructions)
    if instructions:
        developer = oh.DeveloperContent.new().with_instructions("\n\n".join(instructions))
        conversation.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    for message in spec.messages or ():
        if message.role == "user":
            conversation.append(oh.Message.from_role_and_content(oh.Role.USER, message.content))
        elif message.role == "assistant":
            reply = oh.Message.from_role_and_content(oh.Role.ASSISTANT, message.content).with_channel("final")
            conversation.append(reply)
    rendered = harmony_encoding().render_conversation_for_completion(
        oh.Conversation.from_messages(conversation), oh.Role.ASSISTANT
    )
    return list(rendered)

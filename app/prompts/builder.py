"""PromptBuilder: a request's messages (or raw prompt) to the model's prompt tokens. Pure.

gpt-oss gets the Harmony format rendered by openai-harmony itself; other models get their own
chat template. Nothing implicit goes in: the date in gpt-oss's system message is an explicit
field with a fixed default, so the same request gives the same tokens on every day.
``PROMPT_VERSION`` names these rules: change it whenever the rendering changes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from app.prompts.special_text import SpecialText

PROMPT_VERSION = "pb-1"  # tools add to the rendering; prompts without them are unchanged
DEFAULT_CONVERSATION_DATE = "2025-06-28"
ReasoningEffort = Literal["low", "medium", "high"]
Role = Literal["system", "developer", "user", "assistant", "tool"]
# Text at least this long is tokenized by the model's fast tokenizer instead of by openai-harmony:
# harmony holds the GIL for all of it (over a second for 4 MiB: every stream and /health stop
# meanwhile), the fast tokenizer lets go while it works and gives the same ids (tests/test_prompts.py).
LARGE_TEXT = 64 * 1024


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call an assistant message made: its id, the function (its qualified name, see
    ToolSpec), the arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the calls it made (its content may be "")
    name: str | None = None  # tool: the function whose result this is (its qualified name)
    tool_call_id: str | None = None  # tool: the call it answers
    # assistant: the reasoning (gpt-oss's analysis channel) that led to this message; rendered only
    # while its calls are still pending (see pending_reasoning), as Harmony's rules say.
    reasoning: str = ""


@dataclass(frozen=True, slots=True)
class ToolNamespace:
    """A namespace of the request's own (Responses' ``namespace`` tool): Harmony renders it beside
    ``functions``, and its functions are called as ``NAME.FUNCTION``."""

    name: str
    description: str | None = None


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call: its name, description and parameters (canonical JSON schema),
    in ``functions`` or in a namespace of the request's own."""

    name: str
    description: str | None
    parameters: str
    namespace: ToolNamespace | None = None

    @property
    def qualified(self) -> str:
        """How calls name it: ``NAME`` in ``functions``, ``NAMESPACE.NAME`` in another namespace (a
        function's name holds no dot, so the two never meet)."""
        return self.name if self.namespace is None else f"{self.namespace.name}.{self.name}"


FUNCTIONS_NAMESPACE = "functions"


def recipient(qualified: str) -> str:
    """The Harmony recipient of a call to a function known by its qualified name."""
    return qualified if "." in qualified else f"{FUNCTIONS_NAMESPACE}.{qualified}"


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """Everything that decides the prompt tokens, and nothing else."""

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None  # raw text: tokenised as is, no template
    token_ids: tuple[int, ...] | None = None  # a raw prompt given as token ids: nothing to tokenize
    reasoning_effort: ReasoningEffort = "medium"
    conversation_date: str = DEFAULT_CONVERSATION_DATE
    instructions: str | None = None  # extra developer instructions (OpenAI "instructions")
    # gpt-oss only: a json_schema response format (name, description, schema as JSON text), which
    # Harmony states in the developer message under "# Response Formats".
    response_format: tuple[str, str | None, str] | None = None
    tools: tuple[ToolSpec, ...] = ()  # functions offered to the model (none: tool_choice "none")


# The model's transformers tokenizer: ``apply_chat_template``, ``encode`` and calling it are used.
Tokenizer = Any


class PromptError(ValueError):
    """The request cannot be rendered as a prompt for this model."""


def build_prompt_tokens(spec: PromptSpec, tokenizer: Tokenizer | None, harmony: bool) -> tuple[int, ...]:
    """The prompt's token ids. ``tokenizer`` is the model's (for gpt-oss only needed for large
    texts, see LARGE_TEXT)."""
    if spec.token_ids is not None:
        tokens = list(spec.token_ids)
    elif spec.prompt is not None:
        tokens = _encode_raw(spec.prompt, tokenizer, harmony)
    elif spec.messages:
        if harmony:
            tokens = _render_harmony(spec, tokenizer)
        elif tokenizer is None:
            raise PromptError("this model has no tokenizer")
        else:
            tokens = _render_template(spec, tokenizer)
    else:
        raise PromptError("give either messages or prompt")
    if not tokens:
        raise PromptError("the prompt is empty")
    return tuple(tokens)


def fewest_tokens(spec: PromptSpec, max_token_bytes: int) -> int:
    """A lower bound on the prompt's length in tokens, from its size alone: no token holds more
    than ``max_token_bytes`` bytes. Cheap, so a prompt over the context is refused untokenized."""
    if spec.token_ids is not None:
        return len(spec.token_ids)
    texts = [spec.prompt or "", spec.instructions or "", *(m.content for m in spec.messages or ())]
    texts += [m.reasoning for m in spec.messages or ()]
    texts += [t.parameters + (t.description or "") + t.qualified for t in spec.tools]
    texts += [c.arguments for m in spec.messages or () for c in m.tool_calls]
    size = sum(len(text.encode("utf-8", errors="replace")) for text in texts)
    return -(-size // max(1, max_token_bytes))


def _encode_raw(text: str, tokenizer: Tokenizer | None, harmony: bool) -> list[int]:
    if harmony:
        # A raw completion prompt may spell Harmony's special tokens on purpose.
        if tokenizer is not None and len(text) >= LARGE_TEXT:
            return list(tokenizer.encode(text, add_special_tokens=False))
        from app.prompts.harmony_encoding import harmony_encoding

        return list(harmony_encoding().encode(text, allowed_special="all"))
    if tokenizer is None:
        raise PromptError("this model has no tokenizer")
    return list(tokenizer.encode(text))


def _as_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Text that may spell special tokens (``<|im_start|>``), tokenized as the text it is."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _marker(nonce: str, index: int) -> str:
    # A stand-in for a message's content while the template is rendered; the nonce is new on every
    # call, so no client text can spell it.
    return f"\u27e6{nonce}:{index}\u27e7"


def template_takes_tools(tokenizer: Tokenizer) -> bool:
    """The model's chat template renders ``tools`` (and tool calls) itself."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def _template_message(message: ChatMessage, native_tools: bool) -> dict[str, Any]:
    role = message.role if message.role != "developer" else "system"
    if message.role == "assistant" and message.tool_calls:
        if not native_tools:  # the call as the JSON this server asks such a model to answer with
            calls = [_call_json(c) for c in message.tool_calls]
            return {"role": "assistant", "content": "\n".join([*filter(None, [message.content]), *calls])}
        tool_calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
            for c in message.tool_calls
        ]
        return {"role": "assistant", "content": message.content, "tool_calls": tool_calls}
    if message.role == "tool" and native_tools:
        return {"role": "tool", "content": message.content, "name": message.name, "tool_call_id": message.tool_call_id}
    return {"role": role, "content": message.content}


def _call_json(call: ToolCall) -> str:
    return json.dumps({"name": call.name, "arguments": _arguments(call.arguments)}, ensure_ascii=False)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def tools_instructions(tools: tuple[ToolSpec, ...]) -> str:
    """For a chat template that cannot render tools: the functions, and the answer's shape."""
    listed = "\n".join(
        json.dumps({"name": t.qualified, "description": t.description or "", "parameters": json.loads(t.parameters)})
        for t in tools
    )
    return (
        "You can call these functions:\n"
        + listed
        + '\nTo call one, answer with only a JSON object: {"name": <function name>, "arguments": <its arguments>}.'
    )


def _render_template(spec: PromptSpec, tokenizer: Tokenizer) -> list[int]:
    # A template that renders tools renders the calls and results going back in as well, whether
    # or not this request offers tools (tool_choice "none" after a call still shows the call).
    takes_tools = template_takes_tools(tokenizer)
    native_tools = bool(spec.tools) and takes_tools
    messages = [_template_message(m, takes_tools) for m in spec.messages or ()]
    if spec.tools and not native_tools:
        messages.insert(0, {"role": "system", "content": tools_instructions(spec.tools)})
    if spec.instructions:
        messages.insert(0, {"role": "system", "content": spec.instructions})
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptError("this model has no chat template: send a raw prompt instead of messages")
    extra: dict[str, Any] = {}
    if native_tools:
        extra["tools"] = [
            {"type": "function", "function": {"name": t.qualified, "description": t.description or "", "parameters": p}}
            for t in spec.tools
            if (p := json.loads(t.parameters)) is not None
        ]
    guard = SpecialText(_special_texts(tokenizer))
    if not guard.spelled([messages, extra]):
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, **extra
        )
        if isinstance(rendered, dict):  # some tokenizers return a BatchEncoding whatever is asked
            rendered = rendered["input_ids"]
        return list(rendered)
    # The request spells a special token somewhere the template renders it (a message, a call's
    # arguments, a tool's description...): render it around markers, then tokenize the template's
    # own text as usual and what the markers stand for as plain text, so that no client text can
    # open or close a turn (the fast path above is kept for every other prompt).
    text = tokenizer.apply_chat_template(
        guard.neutralized(messages), add_generation_prompt=True, tokenize=False, **guard.neutralized(extra)
    )
    if not isinstance(text, str):
        raise PromptError("the chat template did not render to text")

    def template_text(part: str) -> list[int]:
        return list(tokenizer.encode(part, add_special_tokens=False))

    return guard.tokens(text, template_text, lambda part: _as_text(tokenizer, part))


def _special_texts(tokenizer: Tokenizer) -> list[str]:
    added = getattr(tokenizer, "get_added_vocab", None)
    names = set(added()) if callable(added) else set()
    return sorted(names | set(getattr(tokenizer, "all_special_tokens", ()) or ()))


def _render_harmony(spec: PromptSpec, tokenizer: Tokenizer | None) -> list[int]:
    import openai_harmony as oh

    from app.prompts.harmony_encoding import harmony_encoding

    # Large user and assistant contents are rendered as markers, then spliced in as the fast
    # tokenizer's tokens (the same ids: a message's content is encoded on its own, as plain text).
    nonce = uuid.uuid4().hex
    messages = spec.messages or ()
    kept_reasoning = pending_reasoning(messages)
    large: dict[str, str] = {}  # marker -> the text it stands for

    def text(index: int, content: str) -> str:
        if tokenizer is None or len(content) < LARGE_TEXT:
            return content
        marker = _marker(nonce, index)
        large[marker] = content
        return marker

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
    developer_text = "\n\n".join(instructions)
    if spec.response_format is not None:
        developer_text = (developer_text + "\n\n" if developer_text else "") + _response_format(*spec.response_format)
    if developer_text or spec.tools:
        developer = oh.DeveloperContent.new()
        if developer_text:
            developer = developer.with_instructions(developer_text)
        developer = _with_tools(developer, spec.tools)
        conversation.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    for i, message in enumerate(messages):
        content = message.content if message.role in ("system", "developer") else text(i, message.content)
        if i in kept_reasoning:
            analysis = oh.Message.from_role_and_content(oh.Role.ASSISTANT, text(-1 - i, message.reasoning))
            conversation.append(analysis.with_channel("analysis"))
        if message.role == "user":
            conversation.append(oh.Message.from_role_and_content(oh.Role.USER, content))
        elif message.role == "assistant" and message.tool_calls:
            if content:  # words to the user before the calls: a commentary preamble
                preamble = oh.Message.from_role_and_content(oh.Role.ASSISTANT, content)
                conversation.append(preamble.with_channel("commentary"))
            for call in message.tool_calls:
                conversation.append(
                    oh.Message.from_role_and_content(oh.Role.ASSISTANT, call.arguments)
                    .with_channel("commentary")
                    .with_recipient(recipient(call.name))
                    .with_content_type("<|constrain|>json")
                )
        elif message.role == "assistant":
            reply = oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel("final")
            conversation.append(reply)
        elif message.role == "tool":
            author = oh.Author.new(oh.Role.TOOL, recipient(message.name or ""))
            result = oh.Message.from_author_and_content(author, content).with_channel("commentary")
            conversation.append(result.with_recipient("assistant"))
    encoding = harmony_encoding()
    # Which reasoning is kept was decided above (pending_reasoning); harmony's own dropping rule
    # keeps some finished turns' analysis, so it is off.
    config = oh.RenderConversationConfig(auto_drop_analysis=False)
    tokens = list(
        encoding.render_conversation_for_completion(
            oh.Conversation.from_messages(conversation), oh.Role.ASSISTANT, config
        )
    )
    for marker, content in large.items():
        marker_tokens = list(encoding.encode(marker, allowed_special=set()))
        at = _find(tokens, marker_tokens)
        tokens[at : at + len(marker_tokens)] = _as_text(tokenizer, content)
    return tokens


def pending_reasoning(messages: tuple[ChatMessage, ...]) -> frozenset[int]:
    """The messages whose reasoning goes back into a Harmony prompt: assistant tool calls made
    after the last user message and the last final answer, that is, calls still pending (their
    results are being read). Every finished turn's reasoning is dropped, as gpt-oss was trained."""
    start = 0
    for i, message in enumerate(messages):
        if message.role == "user" or (message.role == "assistant" and not message.tool_calls):
            start = i + 1
    return frozenset(
        i
        for i in range(start, len(messages))
        if messages[i].role == "assistant" and messages[i].tool_calls and messages[i].reasoning
    )


def _with_tools(developer: Any, tools: tuple[ToolSpec, ...]) -> Any:
    """The "functions" namespace, as gpt-oss was trained (with it, the system message says that
    calls go to the commentary channel: openai-harmony adds that line), then each namespace of the
    request's own, in the order the request first names it."""
    import openai_harmony as oh

    functions = [_harmony_tool(t) for t in tools if t.namespace is None]
    if functions:
        developer = developer.with_function_tools(functions)
    namespaces = list(dict.fromkeys(t.namespace for t in tools if t.namespace is not None))
    for namespace in namespaces:
        members = [_harmony_tool(t) for t in tools if t.namespace == namespace]
        config = oh.ToolNamespaceConfig(name=namespace.name, description=namespace.description, tools=members)
        developer = developer.with_tools(config)
    return developer


def _harmony_tool(tool: ToolSpec) -> Any:
    import openai_harmony as oh

    return oh.ToolDescription.new(tool.name, tool.description or "", parameters=json.loads(tool.parameters))


def _response_format(name: str, description: str | None, schema: str) -> str:
    """Harmony's "# Response Formats" section: the schema the final answer follows."""
    comment = f"// {description}\n" if description else ""
    return f"# Response Formats\n\n## {name}\n\n{comment}{schema}"


def _find(tokens: list[int], part: list[int]) -> int:
    for at in range(len(tokens) - len(part) + 1):
        if tokens[at : at + len(part)] == part:
            return at
    raise PromptError("a message's content was lost in rendering")

"""A validated request body to a GenerationJob: prompt tokens, sampling, limits, cache key.

Everything here is decided before any work starts; a value that cannot be served is an ApiError.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from actors.messages import GenerationJob
from app.contract.grammar import GrammarError, GrammarSpec
from app.contract.model import ServedModel
from app.contract.sampling import SamplingDefaults, SamplingParams
from app.http.errors import ApiError
from app.http.schemas import SamplingFields
from app.http.structured import ConstraintError, OutputConstraint, StructuredFields
from app.http.tool_calls import json_call_schema
from app.http.tool_fields import ToolUse
from app.prompts.builder import PROMPT_VERSION, PromptError, PromptSpec, build_prompt_tokens, fewest_tokens
from app.prompts.cache_key import cache_key, prefix_namespace
from app.text.pieces import TextMode

MAX_TIMEOUT_SECONDS = 24 * 3600.0
# A forced call's analysis: at most this many tokens by reasoning_effort, and never more than
# leaves CALL_ROOM tokens of max_tokens for the call (its header is about 15, the rest arguments).
REASONING_BUDGET = {"low": 256, "medium": 1024, "high": 4096}
CALL_ROOM = 128
# tool_choice auto on a model without Harmony: its calls are read back in its chat template's own
# syntax (app.text.template_calls), where the template has one this server knows; else refused,
# and the calls can be forced instead.
FORCE_INSTEAD = "use tool_choice 'required' or a named function (answered through constrained JSON), or 'none'"
AUTO_TOOLS_REFUSED = (
    "tool_choice 'auto' needs a chat template whose tool-call syntax this server reads (Hermes <tool_call> "
    "JSON, Llama 3 JSON), and this model's has none: serve it with --chat-template (or --tool-call-parser), "
    "or " + FORCE_INSTEAD
)
AUTO_TOOLS_REFUSED_HERE = "tool_choice 'auto' is served here on gpt-oss only: on this model " + FORCE_INSTEAD
GREEDY_BELOW = 1e-5  # a temperature this small is greedy decoding
OVER = "context_length_exceeded"
NEUTRAL = SamplingDefaults()
# What an X-Request-Id may be: the ids proxies and clients make (UUIDs, base64, "req-42", ...).
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def client_request_id(header: str | None) -> str | None:
    """The client's X-Request-Id, checked: it is echoed in headers, events and logs only."""
    if header is None:
        return None
    if not CLIENT_REQUEST_ID.fullmatch(header):
        raise ApiError(
            400,
            "X-Request-Id must be 1 to 128 characters of letters, digits and . _ : / + = @ -",
            param="X-Request-Id",
            code="invalid_request_id",
        )
    return header


def prompt_tokens(spec: PromptSpec, model: ServedModel) -> tuple[int, ...]:
    if spec.token_ids is not None and (outside := [t for t in spec.token_ids if not 0 <= t < model.vocab_size]):
        raise ApiError(
            400,
            f"token id {outside[0]} is not in this model's vocabulary (0 to {model.vocab_size - 1})",
            param="prompt",
            code="invalid_value",
        )
    at_least = fewest_tokens(spec, model.max_token_bytes)
    if at_least >= model.max_context:
        raise ApiError(400, too_long(model.max_context, at_least, None, at_least=True), param="messages", code=OVER)
    try:
        return build_prompt_tokens(spec, model.tokenizer, model.harmony)
    except PromptError as error:
        raise ApiError(400, str(error), param="messages" if spec.messages else "prompt") from error


def too_long(context: int, prompt: int, completion: int | None, *, at_least: bool = False) -> str:
    """OpenAI's wording, which LiteLLM and LangChain match to tell a context overflow apart."""
    head = f"This model's maximum context length is {context} tokens. However, "
    if completion is None:
        return (
            head
            + f"your messages resulted in {'at least ' if at_least else ''}{prompt} tokens. "
            + ("Please reduce the length of the messages.")
        )
    return head + (
        f"you requested {prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
        "Please reduce the length of the messages or completion."
    )


def logit_bias(fields: SamplingFields, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """The request's logit_bias as (token id, bias) pairs, each id checked against the vocabulary."""
    if not fields.logit_bias:
        return ()
    bias = sorted((int(key), value) for key, value in fields.logit_bias.items())
    if (outside := [token for token, _ in bias if token >= vocab_size]) != []:
        raise ApiError(
            400,
            f"logit_bias names token {outside[0]}, outside this model's vocabulary (0 to {vocab_size - 1})",
            param="logit_bias",
            code="invalid_value",
        )
    return tuple(bias)


def output_constraint(
    model: ServedModel, fields: SamplingFields, structured: StructuredFields | None, harmony_chat: bool
) -> OutputConstraint | None:
    """The request's response format, compiled by the model's grammar engine (cached): a schema
    or regex the engine cannot serve is a 400 that says why, before any work starts (one never
    compiled raises GrammarPending: see app.http.streams.off_loop)."""
    if structured is None:
        return None
    try:
        constraint = structured.output_constraint(final_channel_only=harmony_chat)
    except ConstraintError as error:
        raise ApiError(400, str(error), param=error.param, code="invalid_response_format") from None
    if constraint is None:
        return None
    if model.grammars is None:
        raise ApiError(400, "structured outputs are off on this server", param=constraint.param)
    for name, value in (("min_tokens", fields.min_tokens), ("ignore_eos", fields.ignore_eos)):
        if value:
            # The grammar decides where the answer ends: nothing may hold it open past that.
            raise ApiError(400, f"{name} cannot be combined with a response format", param=name, code="invalid_value")
    try:
        model.grammars.check_compiled(constraint.grammar)
    except GrammarError as error:
        raise ApiError(400, str(error), param=constraint.param, code="invalid_response_format") from None
    return constraint


def forced_call_grammar(model: ServedModel, tools: ToolUse, spec: PromptSpec, fields: SamplingFields) -> GrammarSpec:
    """tool_choice ``required`` or a named function: the output is one call to an allowed
    function whose arguments follow its schema (on gpt-oss after an analysis: see call_budget).
    Checked before the prompt is tokenized, as it may need compiling first (GrammarPending)."""
    if model.grammars is None:
        raise ApiError(400, "structured outputs are off on this server: no call can be forced", param="tool_choice")
    for name, value in (("min_tokens", fields.min_tokens), ("ignore_eos", fields.ignore_eos)):
        if value:
            raise ApiError(400, f"{name} cannot be combined with a forced tool call", param=name, code="invalid_value")
    schemas = {t.qualified: t.parameters for t in tools.tools}
    if model.harmony and spec.messages is not None:
        pairs = [[name, json.loads(schemas[name])] for name in tools.forced]
        grammar = GrammarSpec("tool_call", json.dumps(pairs, sort_keys=True, separators=(",", ":")))
    else:  # no Harmony: the answer is {"name": ..., "arguments": ...} as JSON
        grammar = GrammarSpec("json_schema", json_call_schema([(name, schemas[name]) for name in tools.forced]))
    try:
        model.grammars.check_compiled(grammar)
    except GrammarError as error:
        raise ApiError(400, str(error), param="tools", code="invalid_value") from None
    return grammar


def call_budget(grammar: GrammarSpec, spec: PromptSpec, max_tokens: int) -> GrammarSpec:
    """A Harmony forced call comes after an analysis of at most the effort's budget of tokens
    (less when max_tokens leaves no more room beside the call)."""
    if grammar.kind != "tool_call":
        return grammar
    budget = max(0, min(REASONING_BUDGET[spec.reasoning_effort], max_tokens - CALL_ROOM))
    return dataclasses.replace(grammar, reasoning_budget=budget)


def sampling_params(
    fields: SamplingFields,
    prompt_length: int,
    max_context: int,
    max_tokens_field: str = "max_tokens",
    *,
    bias: tuple[tuple[int, float], ...] = (),
    grammar: GrammarSpec | None = None,
    defaults: SamplingDefaults = NEUTRAL,
) -> SamplingParams:
    """Check the prompt and max_tokens against the context; fill in what the request left out
    from ``defaults`` (the model's, app.models.generation_defaults), else the neutral values."""
    room = max_context - prompt_length
    if room < 1:
        raise ApiError(400, too_long(max_context, prompt_length, None), param="messages", code=OVER)
    if fields.max_tokens is not None and fields.max_tokens > room:
        message = too_long(max_context, prompt_length, fields.max_tokens)
        raise ApiError(400, message, param=max_tokens_field, code=OVER)
    # A default limit is a bound, never a refusal: a long prompt gets what room it leaves.
    max_tokens = fields.max_tokens if fields.max_tokens is not None else min(room, defaults.max_tokens or room)
    if fields.min_tokens > max_tokens:
        raise ApiError(
            400,
            f"min_tokens ({fields.min_tokens}) is more than max_tokens ({max_tokens})",
            param="min_tokens",
            code="invalid_value",
        )
    top_k = fields.top_k if fields.top_k is not None else defaults.top_k or 0
    temperature = defaults.pick("temperature", fields.temperature)
    return SamplingParams(
        max_tokens=max_tokens,
        # Below this a softmax overflows to inf/nan; vLLM reads it as greedy too.
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=defaults.pick("top_p", fields.top_p),
        top_k=max(top_k, 0),  # 0 and -1: no top-k cut
        min_p=defaults.pick("min_p", fields.min_p),
        seed=fields.seed,
        min_tokens=fields.min_tokens,
        ignore_eos=fields.ignore_eos,
        stop=fields.stop_strings(),
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        repetition_penalty=defaults.pick("repetition_penalty", fields.repetition_penalty),
        logit_bias=bias,
        grammar=grammar,
        logprobs=fields.requested_logprobs(),
    )


def deadline(received_at: float, body_timeout: float | None, header_timeout: str | None) -> float | None:
    """The request's deadline from ``timeout`` in the body or the X-Request-Timeout header."""
    seconds = body_timeout
    if seconds is None and header_timeout is not None:
        try:
            seconds = float(header_timeout)
        except ValueError:
            raise ApiError(
                400,
                "X-Request-Timeout must be a number of seconds",
                param="X-Request-Timeout",
                code="invalid_value",
            ) from None
        if not 0 < seconds < math.inf:
            raise ApiError(
                400, "X-Request-Timeout must be a positive number", param="X-Request-Timeout", code="invalid_value"
            )
    if seconds is None:
        return None
    return received_at + min(seconds, MAX_TIMEOUT_SECONDS)


def build_job(
    model: ServedModel,
    spec: PromptSpec,
    fields: SamplingFields,
    *,
    received_at: float,
    request_id: str | None,
    timeout_header: str | None,
    use_cache: bool,
    max_tokens_field: str = "max_tokens",
    tenant: str | None = None,
    structured: StructuredFields | None = None,
    tools: ToolUse | None = None,
    reads_template_calls: bool = False,
) -> GenerationJob:
    """Everything an endpoint needs to start a generation: tokens, sampling, deadline, cache key.

    ``request_id`` and ``timeout_header`` are the request's ``X-Request-Id`` and
    ``X-Request-Timeout`` headers (the latter may set the deadline). The cheap checks come first;
    tokenizing and the cache key run in a worker thread (see app.http.streams.off_loop).
    ``reads_template_calls``: the endpoint reads calls in the chat template's syntax back (chat
    completions), so tool_choice auto is served on a model whose template has one.
    """
    shown_id = client_request_id(request_id)
    job_deadline = deadline(received_at, fields.timeout, timeout_header)
    bias = logit_bias(fields, model.vocab_size)
    text_mode: TextMode = "harmony" if model.harmony and spec.messages is not None else "plain"
    constraint = output_constraint(model, fields, structured, harmony_chat=text_mode == "harmony")
    forced_call = tools is not None and bool(tools.forced)
    if tools is not None and tools.tools and not forced_call and text_mode != "harmony":
        if model.tool_call_syntax is None:
            raise ApiError(400, AUTO_TOOLS_REFUSED, param="tool_choice", code="invalid_value")
        if not reads_template_calls:
            raise ApiError(400, AUTO_TOOLS_REFUSED_HERE, param="tool_choice", code="invalid_value")
    if forced_call and constraint is not None:
        message = "a forced tool call cannot be combined with a response format"
        raise ApiError(400, message, param="tool_choice", code="invalid_value")
    if constraint is not None and text_mode == "harmony" and constraint.schema_name is not None:
        # gpt-oss was trained to read the schema in its developer message ("# Response Formats").
        schema = (constraint.schema_name, constraint.schema_description, constraint.grammar.source)
        spec = dataclasses.replace(spec, response_format=schema)
    forced = forced_call_grammar(model, tools, spec, fields) if tools is not None and forced_call else None
    tokens = prompt_tokens(spec, model)
    grammar = constraint.grammar if constraint is not None else None
    params = sampling_params(
        fields,
        len(tokens),
        model.max_context,
        max_tokens_field,
        bias=bias,
        grammar=grammar,
        defaults=model.sampling_defaults,
    )
    params = dataclasses.replace(params, prefix_salt=prefix_namespace(tenant, fields.cache_salt))
    if forced is not None:
        params = dataclasses.replace(params, grammar=call_budget(forced, spec, params.max_tokens))
    # parallel_tool_calls false: one call at most (a forced call is one call already).
    single_call = tools is not None and bool(tools.tools) and not tools.parallel and not forced_call
    key = cache_key(PROMPT_VERSION, model.model_id, tokens, params, text_mode, tenant, single_call=single_call)
    return GenerationJob(
        prompt=tokens,
        params=params,
        received_at=received_at,
        client_request_id=shown_id,
        deadline=job_deadline,
        text_mode=text_mode,
        cache_key=key,
        # A request with a deadline could end a generation others share: it runs on its own.
        cacheable=use_cache and params.deterministic and job_deadline is None,
        prompt_version=PROMPT_VERSION,
        single_call=single_call,
        tenant=tenant,
    )

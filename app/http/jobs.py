"""A validated request body to a GenerationJob: prompt tokens, sampling, limits, cache key.

Everything here is decided before any work starts; a value that cannot be served is an ApiError.
"""

from __future__ import annotations

from actors.messages import GenerationJob
from app.contract.model import ServedModel
from app.contract.sampling import SamplingParams
from app.http.errors import ApiError
from app.http.schemas import SamplingFields
from app.prompts.builder import PROMPT_VERSION, PromptError, PromptSpec, build_prompt_tokens
from app.prompts.cache_key import cache_key
from app.text.pieces import TextMode

MAX_TIMEOUT_SECONDS = 24 * 3600.0


def prompt_tokens(spec: PromptSpec, tokenizer: object, harmony: bool) -> tuple[int, ...]:
    try:
        return build_prompt_tokens(spec, tokenizer, harmony)  # type: ignore[arg-type]
    except PromptError as error:
        raise ApiError(400, str(error), param="messages" if spec.messages else "prompt") from error


def sampling_params(
    fields: SamplingFields, prompt_length: int, max_context: int, max_tokens_field: str = "max_tokens"
) -> SamplingParams:
    """Check the prompt and max_tokens against the context; fill in the defaults."""
    room = max_context - prompt_length
    if room < 1:
        raise ApiError(
            400,
            f"the prompt is {prompt_length} tokens, but the model's context is {max_context} tokens "
            "and at least one must be left to generate",
            param="messages",
            code="context_length_exceeded",
        )
    if fields.max_tokens is not None and fields.max_tokens > room:
        raise ApiError(
            400,
            f"the prompt ({prompt_length} tokens) plus {max_tokens_field} ({fields.max_tokens}) is "
            f"{prompt_length + fields.max_tokens} tokens, over the model's context of {max_context} tokens",
            param=max_tokens_field,
            code="context_length_exceeded",
        )
    max_tokens = fields.max_tokens if fields.max_tokens is not None else room
    if fields.min_tokens > max_tokens:
        raise ApiError(
            422, f"min_tokens ({fields.min_tokens}) is more than max_tokens ({max_tokens})", param="min_tokens"
        )
    top_k = fields.top_k if fields.top_k is not None and fields.top_k > 0 else 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if fields.temperature is None else fields.temperature,
        top_p=1.0 if fields.top_p is None else fields.top_p,
        top_k=top_k,
        min_p=fields.min_p or 0.0,
        seed=fields.seed,
        min_tokens=fields.min_tokens,
        ignore_eos=fields.ignore_eos,
        stop=fields.stop_strings(),
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        repetition_penalty=1.0 if fields.repetition_penalty is None else fields.repetition_penalty,
    )


def deadline(received_at: float, body_timeout: float | None, header_timeout: str | None) -> float | None:
    """The request's deadline from ``timeout`` in the body or the X-Request-Timeout header."""
    seconds = body_timeout
    if seconds is None and header_timeout is not None:
        try:
            seconds = float(header_timeout)
        except ValueError:
            raise ApiError(
                422, f"X-Request-Timeout must be a number of seconds, got {header_timeout!r}", param="X-Request-Timeout"
            ) from None
        if not seconds > 0:
            raise ApiError(422, "X-Request-Timeout must be positive", param="X-Request-Timeout")
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
) -> GenerationJob:
    """Everything an endpoint needs to start a generation: tokens, sampling, deadline, cache key.

    ``request_id`` and ``timeout_header`` are the request's ``X-Request-Id`` and
    ``X-Request-Timeout`` headers (the latter may set the deadline).
    """
    tokens = prompt_tokens(spec, model.tokenizer, model.harmony)
    params = sampling_params(fields, len(tokens), model.max_context, max_tokens_field)
    text_mode: TextMode = "harmony" if model.harmony and spec.messages is not None else "plain"
    key = cache_key(PROMPT_VERSION, model.model_id, tokens, params, text_mode)
    job_deadline = deadline(received_at, fields.timeout, timeout_header)
    return GenerationJob(
        prompt=tokens,
        params=params,
        received_at=received_at,
        request_id=request_id or "",
        deadline=job_deadline,
        text_mode=text_mode,
        cache_key=key,
        # A request with a deadline could end a generation others share: it runs on its own.
        cacheable=use_cache and params.deterministic and job_deadline is None,
        prompt_version=PROMPT_VERSION,
    )

"""A request's choices as jobs: ``n`` per prompt, each its own GenerationJob.

OpenAI numbers the choices prompt by prompt: choice index = prompt index * n + j. Choice j of a
seeded request samples from seed + j (wrapped into int64), so that its n choices differ from each
other and are the same on every run; each seed makes its own cache key. Without a seed each
choice draws its own (the runner does). Greedy choices are all the same answer, as OpenAI's are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from actors.messages import GenerationJob
from app.contract.model import ServedModel
from app.http.errors import ApiError
from app.http.jobs import build_job
from app.http.schemas import INT64, SamplingFields
from app.http.structured import StructuredFields
from app.http.tool_fields import ToolUse
from app.prompts.builder import PromptSpec
from app.prompts.cache_key import cache_key

MAX_CHOICES = 64  # prompts x n, in one request


def choice_seed(seed: int, choice: int) -> int:
    """seed + choice, wrapped into the int64 range a seed is allowed (as OpenAI takes it)."""
    return (seed + choice + INT64) % (2 * INT64) - INT64


def choice_job(job: GenerationJob, choice: int, model_id: str) -> GenerationJob:
    """Choice ``choice`` of a prompt whose choice 0 is ``job``: its key is choice 0's but for
    the seed, from the job's own fields (its tenant and single_call included), so that no
    choice of one tenant's request is ever replayed to another."""
    seed = job.params.seed
    if choice == 0 or seed is None:
        return job
    params = dataclasses.replace(job.params, seed=choice_seed(seed, choice))
    if params.greedy:  # the seed changes nothing, nor the key
        return dataclasses.replace(job, params=params)
    key = cache_key(
        job.prompt_version, model_id, job.prompt, params, job.text_mode, job.tenant, single_call=job.single_call
    )
    return dataclasses.replace(job, params=params, cache_key=key)


def check_choice_count(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise ApiError(
            400,
            f"{prompts} prompts x n={n} is {prompts * n} choices: at most {MAX_CHOICES} in one request",
            param="n",
            code="invalid_value",
        )


def build_choice_jobs(
    model: ServedModel,
    specs: Sequence[PromptSpec],
    fields: SamplingFields,
    n: int,
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
) -> list[tuple[GenerationJob, ...]]:
    """Per prompt, its n choices' jobs. Each prompt is tokenized and checked against the context
    on its own (build_job), once: its choices differ only in their seeds."""
    check_choice_count(len(specs), n)
    groups = []
    for spec in specs:
        job = build_job(
            model,
            spec,
            fields,
            received_at=received_at,
            request_id=request_id,
            timeout_header=timeout_header,
            use_cache=use_cache,
            max_tokens_field=max_tokens_field,
            tenant=tenant,
            structured=structured,
            tools=tools,
            reads_template_calls=reads_template_calls,
        )
        groups.append(tuple(choice_job(job, j, model.model_id) for j in range(n)))
    return groups

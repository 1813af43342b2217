"""cache_key: sha256 over the canonical form of everything that decides a response's tokens.

The same request gives the same key in every process and on every day: the input is plain JSON
with sorted keys, no floats printed in a locale- or version-dependent way (repr of a float is
exact and stable), no set order, no clock. Fields that cannot change the output are left out or
normalised (``stream``; top_p, top_k and seed when decoding is greedy; the order of stop strings).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from app.contract.sampling import SamplingParams


def canonical_sampling(params: SamplingParams) -> dict[str, Any]:
    sampling: dict[str, Any] = (
        {"greedy": True}
        if params.greedy
        else {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed}
    )
    if params.min_p and not params.greedy:  # only when set: other keys stay as they were
        sampling["min_p"] = params.min_p
    if params.penalized:  # only when set: the keys of requests without penalties stay as they were
        sampling["penalties"] = {
            "presence": params.presence_penalty,
            "frequency": params.frequency_penalty,
            "repetition": params.repetition_penalty,
        }
    # Each only when set, so that the keys of requests without them stay as they were.
    if params.logit_bias:
        sampling["logit_bias"] = [[token, bias] for token, bias in params.logit_bias]
    if params.logprobs is not None:  # the answer carries them: a replay must too
        sampling["logprobs"] = params.logprobs
    if params.grammar is not None:
        grammar = params.grammar
        sampling["grammar"] = {"kind": grammar.kind, "source": grammar.source, "final": grammar.final_channel_only}
        if grammar.reasoning_budget:  # only when set: other grammars' keys stay as they were
            sampling["grammar"]["reasoning_budget"] = grammar.reasoning_budget
    return {
        **sampling,
        "max_tokens": params.max_tokens,
        "min_tokens": params.min_tokens,
        "ignore_eos": params.ignore_eos,
        "stop": sorted(set(params.stop)),
    }


def prefix_namespace(tenant: str | None, cache_salt: str | None) -> bytes:
    """The prefix KV cache's namespace for a request (SamplingParams.prefix_salt): a hash of its
    tenant (the API key by name, never the key) and its cache_salt, so that prefixes are shared
    only by requests that have both the same. b"" without either: the one shared namespace."""
    if tenant is None and cache_salt is None:
        return b""
    document = json.dumps([tenant, cache_salt], separators=(",", ":"), ensure_ascii=True)
    return hashlib.blake2b(document.encode("ascii"), digest_size=16, person=b"prefix-kv").digest()


def cache_key(
    prompt_version: str,
    model_id: str,
    prompt_tokens: Sequence[int],
    params: SamplingParams,
    text_mode: str,
    tenant: str | None = None,
    *,
    single_call: bool = False,
) -> str:
    """``tenant`` (the caller's API key, by name) keeps one tenant's cached answers from another;
    without API keys there is one tenant and the key is as it always was."""
    document: dict[str, Any] = {
        "prompt_version": prompt_version,
        "model": model_id,
        "prompt_tokens": list(prompt_tokens),
        "sampling": canonical_sampling(params),
        "text_mode": text_mode,
    }
    if tenant is not None:
        document["tenant"] = tenant
    if params.prefix_salt:  # the tenant's and the cache_salt's namespace: a salted answer is its own
        document["prefix_salt"] = params.prefix_salt.hex()
    if single_call:  # only when set: other keys stay as they were
        document["single_call"] = True
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()

"""Why a request ends: by its own tokens (a stop token, its length) or by an abort."""

from __future__ import annotations

from typing import Literal

from app.contract.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "timeout", "shutdown", "error"]
# choice_failed: another choice of the same request failed or could not start; nobody reads this one.
AbortReason = Literal[
    "client_disconnect",
    "stop_string",
    "single_call",
    "timeout",
    "shutdown",
    "stalled",
    "relay_error",
    "choice_failed",
]

ABORT_FINISH: dict[AbortReason, FinishReason] = {
    "client_disconnect": "cancelled",
    "stalled": "cancelled",
    "stop_string": "stop",
    "single_call": "stop",  # parallel_tool_calls false: the output ends once its first call is whole
    "timeout": "timeout",
    "shutdown": "shutdown",
    "relay_error": "error",
    "choice_failed": "cancelled",
}


def must_continue(generated: int, params: SamplingParams) -> bool:
    """Below min_tokens a request may not end: the runner masks its stop tokens for the next one."""
    return not params.ignore_eos and generated < params.min_tokens


def finish_reason(
    token: int,
    generated: int,
    params: SamplingParams,
    stop_token_ids: frozenset[int],
    context_used: int,
    max_context: int,
) -> tuple[FinishReason | None, bool]:
    """After the ``generated``-th token: whether the request ends, and whether ``token`` is a stop
    token (counted, never shown). A stop token below min_tokens does not end it (a runner that
    masks them never gives one; the rule holds whatever the runner did)."""
    is_stop = token in stop_token_ids and not params.ignore_eos
    if is_stop and generated >= params.min_tokens:
        return "stop", True
    if generated >= params.max_tokens or context_used >= max_context:
        return "length", False
    return None, False

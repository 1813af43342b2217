"""Why a request failed, as a stable code and a sentence in our words: all that its client is told.

The exception behind a failure goes to the log (with the request's id), never to the client: its
text can hold paths, tensor shapes or another request's data.
"""

from __future__ import annotations

from typing import Literal

FailureCode = Literal[
    "step_failed",
    "non_finite_logits",
    "out_of_memory",
    "sampling_failed",
    "grammar_failed",
    "text_failed",
    "cache_failed",
    "start_failed",
    "scheduler_stopped",
    "stream_lost",
]

FAILURE_MESSAGES: dict[FailureCode, str] = {
    "step_failed": "the model step that served this request failed",
    "non_finite_logits": "the model's output for this request was not a number (non-finite logits)",
    "out_of_memory": "the accelerator ran out of memory for this request, also with the batch split",
    "sampling_failed": "choosing this request's next token failed",
    "grammar_failed": "the output could not be kept to this request's response format",
    "text_failed": "turning this request's tokens into text failed",
    "cache_failed": "the prompt cache could not serve this request",
    "start_failed": "the generation for this request could not be started",
    "scheduler_stopped": "the server stopped before this request finished",
    "stream_lost": "the generation stream ended without a result",
}


def first_line(error: BaseException) -> str:
    """An exception in one line, for a log field or a short reason: its message's first line, or
    its type's name when it says nothing."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

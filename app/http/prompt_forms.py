"""/v1/completions' prompt in the forms OpenAI takes it: a string, a list of strings, a list of
token ids, or a list of lists of token ids.

Checked before pydantic's own union check of the field, which would coerce (a bool is an int to
it) and name every member of the union in its error: here it is one rule, one message, and the
400 names ``prompt``. Token ids past the vocabulary are checked against the model (app/http/jobs.py).
"""

from __future__ import annotations

from typing import Any, cast

MAX_PROMPTS = 16
PromptField = str | list[str] | list[int] | list[list[int]]


def _token_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def prompt_forms(value: object) -> object:
    """``value`` itself if it is one of the forms, with no empty list and no negative id; else ValueError."""
    if isinstance(value, str):
        return value
    forms = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if not isinstance(value, list) or not value:
        raise ValueError(f"prompt must be {forms}, and not empty")
    if _token_ids(value):
        prompts: list[Any] = [value]
    elif all(isinstance(item, str) for item in value) or all(isinstance(item, list) for item in value):
        prompts = value
    else:
        raise ValueError(f"prompt must be {forms}: one kind, not a mix")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
    for item in prompts:
        if isinstance(item, str):
            continue
        if not item or not _token_ids(item):
            raise ValueError("a prompt of token ids must be a non-empty list of integers")
        if min(item) < 0:
            raise ValueError("token ids are 0 or more")
    return value


def prompt_list(value: PromptField) -> list[str | tuple[int, ...]]:
    """A checked prompt field as its prompts: each a text, or token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value[0], int):
        return [tuple(cast(list[int], value))]
    return [item if isinstance(item, str) else tuple(item) for item in cast(list[str | list[int]], value)]

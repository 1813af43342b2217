"""What a /v1/responses request may bring, checked before anything is generated or stored.

- Every input item, reasoning included, fits the model's context on its own: an item longer than
  the context can be no part of any prompt (and a reasoning item that the prompt leaves out would
  otherwise be stored unchecked). Cheap first: an item's tokens are at most its bytes, so only an
  item of more bytes than the context is tokenized.
- With ``store``, the conversation this response continues and this input fit the caller's share
  of the response store (--responses-max-mb per API key): a row over it could never be kept.
Both are 400s in OpenAI's error shape.
"""

from __future__ import annotations

from collections.abc import Iterator

from app.contract.model import ServedModel
from app.http.errors import ApiError
from app.http.jobs import OVER, too_long
from app.http.responses_schemas import Item
from app.store.responses import StoredResponse, encode


def item_texts(item: Item) -> Iterator[str]:
    """The text an input item carries, whatever its type (normalize_item's shapes)."""
    for part in (*item.get("content", ()), *item.get("summary", ())):
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            yield part["text"]
    for field in ("name", "arguments", "output"):
        if isinstance(item.get(field), str):
            yield item[field]


def check_items_fit(model: ServedModel, items: list[Item]) -> None:
    """Each item's text within the context (tokenizing only what its size leaves in doubt)."""
    for index, item in enumerate(items):
        text = "".join(item_texts(item))
        if len(text.encode("utf-8", errors="replace")) < model.max_context:
            continue  # no token is less than a byte
        tokens = len(model.tokenizer.encode(text, add_special_tokens=False))
        if tokens >= model.max_context:
            raise ApiError(400, too_long(model.max_context, tokens, None), param=f"input[{index}]", code=OVER)


def check_store_share(input_items: list[Item], history: list[Item], share_bytes: int) -> None:
    """The stored row this response would make, before its output, within one tenant's share."""
    size = len(encode(StoredResponse({}, input_items, history)))
    if size > share_bytes:
        raise ApiError(
            400,
            f"this input and the conversation it continues are {size} bytes, over the {share_bytes} bytes "
            "one API key may keep in the response store (--responses-max-mb): send it with store false, "
            "or start a new conversation",
            param="input",
            code="invalid_value",
        )

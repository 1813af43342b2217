"""The prefix KV cache per tenant and per ``cache_salt``: what one API key (or one salt) left behind
is never another's ``cached_tokens``, and the block hash chains each block to its parent.

Breakage each test catches: a block chain shared across API keys (tenant B reads from
``cached_tokens`` how much of a guessed prompt tenant A sent, a block at a time); a ``cache_salt``
that is ignored, or that the whole-response cache ignores (the same deterministic request under
another salt replayed, all of its tokens cached); a tenant that no longer reuses its own prefixes;
a salt of the wrong type or size taken (or failed with a 500) instead of a 400 naming it; a block
key that ignores its parent (a second history with the same block at the same position is never
stored, so it reuses less).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from app.engine.loader import ModelWeights
from app.engine.memory_pools import PagePool, PageShape
from app.engine.prefix_cache import LayerLayout, PrefixKVCache
from app.prompts.cache_key import prefix_namespace
from tests.conftest import server_config, server_in_thread

ALICE, BOB = "alice-key-0001", "bob-key-00002"
# Long enough for three whole 32-token blocks; the second prompt continues the first, so it
# resumes where the first one's prompt ended (where tiny-gpt-oss's sliding layers kept a window).
SECRET = "The vault code is 4471. " + " ".join(f"word{i}" for i in range(120))
FOLLOW_UP = SECRET + " And what else is in the vault?"


@pytest.fixture(scope="module")
def url(tiny_weights: ModelWeights) -> Iterator[str]:
    with server_in_thread(tiny_weights, server_config(api_keys=(ALICE, BOB))) as served:
        yield served


def complete(url: str, key: str, prompt: str, **extra: Any) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)


def cached(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_a_tenant_reuses_its_own_prefixes_and_never_another_tenants(url: str) -> None:
    assert cached(complete(url, ALICE, SECRET)) == 0
    assert cached(complete(url, ALICE, FOLLOW_UP)) >= 96  # Alice resumes at her first prompt's end
    assert cached(complete(url, BOB, FOLLOW_UP)) == 0  # Bob's guess of her prompt: nothing cached
    assert cached(complete(url, BOB, FOLLOW_UP + " More.")) >= 96  # his own prompt he does reuse


def test_two_cache_salts_under_one_key_share_nothing(url: str) -> None:
    prompt, follow_up = "Salted. " + SECRET, "Salted. " + FOLLOW_UP
    assert cached(complete(url, ALICE, prompt, cache_salt="user-1")) == 0
    assert cached(complete(url, ALICE, follow_up, cache_salt="user-1")) >= 96
    # The same deterministic request under another salt: neither its prefix nor its answer is shared.
    other = complete(url, ALICE, follow_up, cache_salt="user-2")
    assert cached(other) == 0 and other.headers.get("X-Cache") != "HIT"
    assert cached(complete(url, ALICE, follow_up + " Again.")) == 0  # no salt: a namespace of its own too
    assert cached(complete(url, ALICE, follow_up + " Again.", cache_salt="user-1")) >= 96


ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("/generate", {"prompt": "hi", "max_tokens": 1, "stream": False}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 1}),
]


@pytest.mark.parametrize(("path", "body"), ROUTES)
@pytest.mark.parametrize("salt", [7, "", "x" * 257, ["a"], {"a": 1}, True])
def test_a_cache_salt_that_is_not_a_short_string_is_a_400(
    url: str, path: str, body: dict[str, Any], salt: object
) -> None:
    response = httpx.post(
        f"{url}{path}", json={**body, "cache_salt": salt}, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "cache_salt" and error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and (error["code"] is None or isinstance(error["code"], str))


@pytest.mark.parametrize(("path", "body"), ROUTES)
def test_every_generation_route_takes_a_cache_salt(url: str, path: str, body: dict[str, Any]) -> None:
    salted = {**body, "cache_salt": "user-é-" + "x" * 240}
    response = httpx.post(f"{url}{path}", json=salted, headers={"Authorization": f"Bearer {BOB}"}, timeout=30)
    assert response.status_code == 200, response.text


def test_the_namespace_names_neither_the_key_nor_the_salt() -> None:
    assert prefix_namespace(None, None) == b""
    spaces = {prefix_namespace(t, s) for t in (None, "tenant-a", "tenant-b") for s in (None, "u1", "u2")}
    assert len(spaces) == 9 and all(len(space) == 16 for space in spaces - {b""})
    assert prefix_namespace("a", "b,c") != prefix_namespace("a,b", "c")  # no two pairs run together


# -- the hash chain, on rows of plain tensors ------------------------------------------------------
BLOCK = 8


class Rows:
    """Rows of keys like a runner's cache: [rows, heads, positions, head_dim] per layer."""

    def __init__(self) -> None:
        self.keys = [torch.randn(3, 2, 64, 4) for _ in range(2)]
        self.values = [torch.randn(3, 2, 64, 4) for _ in range(2)]

    def read_keys(self, row: int, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][row, :, start:end], self.values[layer][row, :, start:end]

    def write_keys(self, row: int, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[layer][row, :, start : start + keys.shape[1]] = keys
        self.values[layer][row, :, start : start + keys.shape[1]] = values


def block(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(BLOCK)]


def test_a_block_seen_under_another_parent_is_stored_and_reused_apart() -> None:
    pool = PagePool(PageShape(2, BLOCK, 4), 1 << 20, torch.float32, torch.device("cpu"))
    cache = PrefixKVCache(LayerLayout(full=(0, 1), sliding=(), window=None), pool)
    rows = Rows()
    shared = block(9)  # the same tokens at the same position (block 1) in two histories
    first, second = [*block(1), *shared, *block(2)], [*block(3), *shared, *block(4)]
    assert cache.store(first, len(first), rows, 0) == 3
    assert cache.store(second, len(second), rows, 1) == 3, "the second history's block 1 has its own key"
    assert cache.lookup([*second, 7]).length == 3 * BLOCK
    assert cache.lookup([*first, 7]).length == 3 * BLOCK
    match = cache.lookup([*second, 7])
    cache.load(match, rows, 2)
    assert torch.equal(rows.keys[1][2, :, : 3 * BLOCK], rows.keys[1][1, :, : 3 * BLOCK])  # second's keys
    # One history in two namespaces: the salt is the first block's parent.
    assert cache.lookup([*first, 7], salt=prefix_namespace("tenant-b", None)).length == 0

"""Reasoning that survives ``store: false`` (app/store/reasoning_seal.py): each reasoning item's
text sealed as ``encrypted_content`` for its tenant, opened back into the Harmony prompt.

Pure first: the seal opens only what it sealed, for the tenant it sealed it for; the generated
secret is kept in a file only its owner can read, and replicas given one --reasoning-key open
each other's blobs. Then live on the tiny gpt-oss: a scripted call's reasoning goes out sealed
and, sent back without its text, is in the next prompt; a blob that was changed, cut short, made
under another key or for another API key is a 400 ``invalid_encrypted_content``.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import ConfigError, ServerConfig
from app.engine.loader import ModelWeights
from app.http.access import tenant_name
from app.server import reasoning_seal
from app.store.reasoning_seal import KEY_FILE, ReasoningSeal, SealBroken, kept_secret
from tests.conftest import server_config, server_in_thread
from tests.scripted_harmony import answered_and_streamed, scripted_server
from tests.test_responses_tools import GET_WEATHER
from tests.test_tool_calls_live import CALL, client

MODEL = "tiny-gpt-oss"
KEY = "k" * 40
ALICE, BOB = "alice-key-0001", "bob-key-00002"
THOUGHT = "I need the weather."


def cut(blob: str) -> str:
    return blob[:-8]


def changed(blob: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(blob))
    raw[20] ^= 1
    return base64.urlsafe_b64encode(bytes(raw)).decode()


def test_a_blob_opens_only_under_its_key_for_its_tenant() -> None:
    seal = ReasoningSeal(KEY.encode())
    blob = seal.seal(THOUGHT, "alice")
    assert THOUGHT not in blob and seal.open(blob, "alice") == THOUGHT
    assert ReasoningSeal(KEY.encode()).open(blob, "alice") == THOUGHT  # a replica with the same key
    assert seal.seal(THOUGHT, "alice") != blob  # a fresh nonce each time
    for broken, tenant in [
        (changed(blob), "alice"),
        (cut(blob), "alice"),
        (blob[:10], "alice"),
        ("not base64 at all!", "alice"),
        (blob, "bob"),
        (blob, None),
        (ReasoningSeal.ephemeral().seal(THOUGHT, "alice"), "alice"),
    ]:
        with pytest.raises(SealBroken):
            seal.open(broken, tenant)


def test_the_generated_secret_is_kept_for_its_owner_alone(tmp_path: Path) -> None:
    secret = kept_secret(tmp_path / "store")
    path = tmp_path / "store" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(secret) >= 43
    assert kept_secret(tmp_path / "store") == secret
    assert os.listdir(tmp_path / "store") == [KEY_FILE]  # no temporary file left behind
    path.chmod(0o644)
    with pytest.raises(OSError, match="chmod 600"):
        kept_secret(tmp_path / "store")


def test_the_server_keeps_its_secret_beside_the_store_or_takes_the_flag(tmp_path: Path) -> None:
    beside = ServerConfig(responses_db=str(tmp_path / "responses.db"))
    blob = reasoning_seal(beside).seal(THOUGHT, None)
    assert (tmp_path / KEY_FILE).exists() and reasoning_seal(beside).open(blob, None) == THOUGHT  # a restart
    flagged = ServerConfig(responses_db=":memory:", reasoning_key=KEY)
    assert reasoning_seal(flagged).open(ReasoningSeal(KEY.encode()).seal(THOUGHT, None), None) == THOUGHT
    with pytest.raises(ConfigError, match="at least 32"):
        ServerConfig(reasoning_key="short")
    assert KEY not in repr(flagged)


def sealed_item(blob: str, text: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": blob}
    return item if text is None else item | {"content": [{"type": "reasoning_text", "text": text}]}


async def test_sealed_reasoning_goes_out_and_comes_back_into_the_prompt(tiny_weights: ModelWeights) -> None:
    asked: dict[str, Any] = {
        "model": MODEL,
        "input": "Weather in Paris?",
        "tools": [GET_WEATHER],
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "max_output_tokens": 80,
        "extra_body": {"cache": False},
    }
    async with scripted_server(tiny_weights, CALL + CALL) as server, client(server) as api:
        first, events = await answered_and_streamed(api, asked)
        reasoning, call = first.output
        assert reasoning.type == "reasoning" and reasoning.encrypted_content
        assert call.type == "function_call"
        [done] = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "reasoning"]
        assert done.encrypted_content and done.encrypted_content != reasoning.encrypted_content
        plain = (await api.responses.create(model=MODEL, input="Weather in Paris?", max_output_tokens=1)).output[0]
        assert getattr(plain, "encrypted_content", None) is None  # only when include asks

        async def input_tokens(*thought: dict[str, Any]) -> int:
            turn = [
                {"role": "user", "content": "Weather in Paris?"},
                *thought,
                {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
            ]
            answer = await api.responses.create(
                model=MODEL,
                input=turn,  # type: ignore[arg-type]
                tools=[GET_WEATHER],
                store=False,
                max_output_tokens=1,
            )
            assert answer.usage is not None
            return answer.usage.input_tokens

        assert reasoning.encrypted_content is not None and done.encrypted_content is not None
        sealed_only = await input_tokens(sealed_item(reasoning.encrypted_content))
        in_words = await input_tokens({"type": "reasoning", "content": [{"type": "reasoning_text", "text": THOUGHT}]})
        assert sealed_only == in_words > await input_tokens()
        # The blob wins over a content that disagrees with it: the text the model wrote is what goes in.
        assert await input_tokens(sealed_item(done.encrypted_content, "something else")) == in_words


@pytest.fixture(scope="module")
def live(tiny_weights: ModelWeights) -> Iterator[str]:
    with server_in_thread(tiny_weights, server_config(api_keys=(ALICE, BOB), reasoning_key=KEY)) as url:
        yield url


def post(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
        return http.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 1, "store": False, **body})


GOOD = ReasoningSeal(KEY.encode()).seal(THOUGHT, tenant_name(ALICE))


@pytest.mark.parametrize(
    ("blob", "key"),
    [
        (changed(GOOD), ALICE),
        (cut(GOOD), ALICE),
        (ReasoningSeal(b"another server's secret, not ours").seal(THOUGHT, tenant_name(ALICE)), ALICE),
        (GOOD, BOB),  # sealed for another API key
        ("!" * 40, ALICE),
    ],
    ids=["changed", "cut", "foreign", "other-tenant", "garbage"],
)
def test_a_blob_that_does_not_open_is_a_400(live: str, blob: str, key: str) -> None:
    response = post(live, key, {"input": [{"role": "user", "content": "Hi"}, sealed_item(blob)]})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": "input[1].encrypted_content",
        "code": "invalid_encrypted_content",
    }
    assert "does not open" in response.json()["error"]["message"]


def test_the_tenant_it_was_sealed_for_is_served_and_bad_fields_are_400s(live: str) -> None:
    assert post(live, ALICE, {"input": [{"role": "user", "content": "Hi"}, sealed_item(GOOD)]}).status_code == 200
    refused: list[tuple[dict[str, Any], str]] = [
        ({"input": "Hi", "include": ["reasoning.everything"]}, "is not one of"),
        ({"input": [{"role": "user", "content": "Hi"}, sealed_item(GOOD) | {"encrypted_content": 3}]}, "encrypted"),
    ]
    for body, words in refused:
        response = post(live, ALICE, body)
        assert response.status_code == 400 and words in response.json()["error"]["message"], response.text

"""/v1/responses end to end: the official `openai` client (sync and async) against a live server.

SmolLM2 (a real instruct model) behind two API keys, one server for the module: create (string
and item input, instructions, a json_schema text.format), streaming (the typed events, in order),
retrieve, input_items, delete, a 3-turn previous_response_id chain, store: false, tenants, the
404s and 400s, max_output_tokens. Then the store across a restart, a dropped stream, and the tiny
gpt-oss with scripted Harmony analysis tokens for the reasoning item.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any, cast

import httpx
import jsonschema
import openai
import pytest

from app.engine.loader import ModelWeights
from app.store.responses import MEMORY, SqliteResponseStore, StoredResponse
from tests.conftest import RunningServer, running_server, server_config, server_in_thread, wait_for_stats
from tests.fakes import slow_steps
from tests.scripted_harmony import THEN_FINAL, scripted_server
from tests.test_structured_outputs import SCHEMA, Verdict

MODEL = "smollm2-135m"
ALICE, BOB = "alice-key-0001", "bob-key-00002"
ORIGIN = "https://app.example"


CLIENTS: dict[tuple[str, str], openai.OpenAI] = {}


@pytest.fixture(scope="module")
def live(smollm2_weights: ModelWeights) -> Iterator[str]:
    config = server_config(model=MODEL, api_keys=(ALICE, BOB), allowed_origins=(ORIGIN,))
    with server_in_thread(smollm2_weights, config) as url:
        yield url
        while CLIENTS:
            CLIENTS.popitem()[1].close()


def client(url: str, key: str = ALICE) -> openai.OpenAI:
    """One client per server and key, closed with the module's server (no socket left open)."""
    if (url, key) not in CLIENTS:
        CLIENTS[url, key] = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    return CLIENTS[url, key]


def own_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def raw(url: str, method: str, path: str, key: str = ALICE, **kwargs: Any) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
        return http.request(method, path, **kwargs)


def test_create_retrieve_list_and_delete_a_response(live: str) -> None:
    api = client(live)
    response = api.responses.create(model=MODEL, input="Say hello.", max_output_tokens=12, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_") and len(response.id) == 37
    assert response.status in ("completed", "incomplete")
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text" and response.output_text == message.content[0].text != ""
    usage = response.usage
    assert usage is not None and usage.output_tokens >= 1
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert api.responses.retrieve(response.id).model_dump() == response.model_dump()
    items = [item.model_dump() for item in api.responses.input_items.list(response.id).data]
    assert [(item["type"], item["role"]) for item in items] == [("message", "user")]
    assert [(part["type"], part["text"]) for part in items[0]["content"]] == [("input_text", "Say hello.")]
    deleted = raw(live, "DELETE", f"/v1/responses/{response.id}")
    assert deleted.json() == {"id": response.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError) as missing:
        api.responses.retrieve(response.id)
    assert missing.value.code == "not_found"


def test_item_input_and_instructions_shape_the_prompt(live: str) -> None:
    api = client(live)
    items: Any = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a color."}]},
    ]
    bare = api.responses.create(model=MODEL, input=items, max_output_tokens=2, temperature=0)
    told = api.responses.create(
        model=MODEL,
        instructions="You answer in one word.",
        input=items,
        max_output_tokens=2,
        temperature=0,
        metadata={"case": "items"},
    )
    assert told.instructions == "You answer in one word." and told.metadata == {"case": "items"}
    # The same prompt as chat's: the instructions first, then the developer message, then the user's.
    chat = api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
        max_tokens=1,
        extra_body={"instructions": "You answer in one word."},
    )
    assert bare.usage is not None and told.usage is not None and chat.usage is not None
    assert told.usage.input_tokens == chat.usage.prompt_tokens > bare.usage.input_tokens


def test_a_json_schema_text_format_answers_in_the_schema(live: str) -> None:
    response = client(live).responses.create(
        model=MODEL,
        input="Is the sky blue? Answer in JSON.",
        text={"format": {"type": "json_schema", "name": "verdict", "schema": SCHEMA, "strict": True}},
        max_output_tokens=60,
        temperature=0,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
    assert response.model_dump()["text"]["format"]["type"] == "json_schema"


def check_event_sequence(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The typed events in their order; returns the terminal event's response."""
    kinds = [event["type"] for event in events]
    numbers = [event["sequence_number"] for event in events]
    assert numbers == sorted(set(numbers)) and numbers[0] == 0, numbers
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    [done] = [event for event in events if event["type"] == "response.output_text.done"]
    assert deltas == done["text"] != ""
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == deltas
    return cast(dict[str, Any], final)


def sse_events(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]  # each `event:` line names its data's type
        events.append(data)
    return events


def test_a_raw_stream_is_the_typed_events_and_is_stored(live: str) -> None:
    body = {"model": MODEL, "input": "Count to five.", "max_output_tokens": 10, "temperature": 0, "stream": True}
    streamed = raw(live, "POST", "/v1/responses", json=body)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    final = check_event_sequence(sse_events(streamed.text))
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert sse_events(streamed.text)[-1]["type"] == "response.incomplete"
    assert raw(live, "GET", f"/v1/responses/{final['id']}").json() == final


async def test_the_async_client_streams_with_stream_true(live: str) -> None:
    api = openai.AsyncOpenAI(base_url=f"{live}/v1", api_key=ALICE, max_retries=0, timeout=120)
    stream = await api.responses.create(model=MODEL, input="Hi!", max_output_tokens=8, temperature=0, stream=True)
    events = [event.model_dump() async for event in stream]
    final = check_event_sequence(events)
    stored = await api.responses.retrieve(final["id"])
    assert stored.output_text == final["output"][0]["content"][0]["text"]
    await api.close()


def test_the_sync_stream_helper_parses_the_final_response(live: str) -> None:
    # The helper's final response needs response.completed: the schema makes the answer end.
    with client(live).responses.stream(
        model=MODEL, input="Is the sky blue? Answer in JSON.", text_format=Verdict, max_output_tokens=60, temperature=0
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text != ""
    assert isinstance(final.output_parsed, Verdict)


def test_a_three_turn_chain_holds_every_earlier_item(live: str) -> None:
    api = client(live)
    questions = ["My name is Ada.", "I live in Paris.", "Where do I live?"]
    turns = []
    previous: str | None = None
    for question in questions:
        extra: dict[str, Any] = {"previous_response_id": previous} if previous else {}
        turn = api.responses.create(model=MODEL, input=question, max_output_tokens=6, temperature=0, **extra)
        turns.append(turn)
        previous = turn.id
    messages: list[dict[str, str]] = []
    for question, turn in zip(questions, turns, strict=True):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": turn.output_text}]
    # The same conversation as chat messages: turn 3's prompt is exactly turns 1 and 2, then its question.
    chat = api.chat.completions.create(model=MODEL, messages=messages[:-1], max_tokens=1)  # type: ignore[arg-type]
    assert turns[2].usage is not None and chat.usage is not None
    assert turns[2].usage.input_tokens == chat.usage.prompt_tokens
    # Its prompt starts with turn 2's: the prefix KV cache had those keys (32-token blocks).
    assert 32 <= turns[2].usage.input_tokens_details.cached_tokens < turns[2].usage.input_tokens
    assert turns[2].previous_response_id == turns[1].id
    # Its input items are its own input; the chain is rebuilt from the store, not from the client.
    items = [item.model_dump() for item in api.responses.input_items.list(turns[2].id).data]
    assert [item["content"][0]["text"] for item in items] == ["Where do I live?"]


def test_store_false_is_not_kept_and_cannot_be_chained(live: str) -> None:
    api = client(live)
    response = api.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    assert response.model_dump()["store"] is False
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as chained:
        api.responses.create(model=MODEL, input="Again", previous_response_id=response.id, max_output_tokens=2)
    assert chained.value.code == "not_found" and chained.value.param == "previous_response_id"


def test_one_tenant_can_neither_read_nor_chain_anothers(live: str) -> None:
    alices = client(live, ALICE).responses.create(model=MODEL, input="secret", max_output_tokens=2)
    bob = client(live, BOB)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(alices.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.input_items.list(alices.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model=MODEL, input="and?", previous_response_id=alices.id, max_output_tokens=2)
    assert raw(live, "DELETE", f"/v1/responses/{alices.id}", key=BOB).status_code == 404
    assert client(live, ALICE).responses.retrieve(alices.id).id == alices.id  # still there for Alice
    assert raw(live, "GET", f"/v1/responses/{alices.id}", key="no-such-key").status_code == 401


def test_a_page_on_an_allowed_origin_may_delete(live: str) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"}
    with httpx.Client(base_url=live, timeout=30) as http:
        answer = http.options("/v1/responses/resp_" + "0" * 32, headers=preflight)
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "DELETE" in answer.headers["Access-Control-Allow-Methods"].split(", ")


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools", "only function tools"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input", "answers no earlier"),
        ({"input": [{"type": "mcp_call", "id": "m"}]}, "input", "only function tools"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input", "text only"),
        ({"input": []}, "input", "at least one"),
        ({"previous_response_id": "resp_../../etc"}, "previous_response_id", "response id"),
        ({"max_output_tokens": 0}, "max_output_tokens", "greater than"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "schema"),
    ],
)
def test_refused_requests_are_400s_that_say_why(live: str, body: dict[str, Any], param: str, words: str) -> None:
    response = raw(live, "POST", "/v1/responses", json={"model": MODEL, "input": "Hi", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param) and words in error["message"], error
    assert isinstance(error["code"], str)


def test_unknown_and_malformed_ids_are_404s(live: str) -> None:
    unknown = "resp_" + "0" * 32
    for method, path in [
        ("GET", f"/v1/responses/{unknown}"),
        ("DELETE", f"/v1/responses/{unknown}"),
        ("GET", f"/v1/responses/{unknown}/input_items"),
        ("GET", "/v1/responses/chatcmpl-123"),
    ]:
        response = raw(live, method, path)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client(live).responses.create(model=MODEL, input="Hi", previous_response_id=unknown)


def test_input_items_page_in_either_order(live: str) -> None:
    words = ["one", "two", "three", "four", "five"]
    given = [{"role": "user", "content": word} for word in words]
    response = client(live).responses.create(model=MODEL, input=given, max_output_tokens=1)  # type: ignore[arg-type]
    path = f"/v1/responses/{response.id}/input_items"

    def texts(page: dict[str, Any]) -> list[str]:
        return [item["content"][0]["text"] for item in page["data"]]

    newest = raw(live, "GET", path, params={"limit": 2}).json()
    assert newest["object"] == "list" and texts(newest) == ["five", "four"] and newest["has_more"] is True
    assert newest["first_id"] == newest["data"][0]["id"] and newest["last_id"] == newest["data"][1]["id"]
    rest = raw(live, "GET", path, params={"limit": 10, "after": newest["last_id"]}).json()
    assert texts(rest) == ["three", "two", "one"] and rest["has_more"] is False
    oldest = raw(live, "GET", path, params={"order": "asc", "limit": 3}).json()
    assert texts(oldest) == ["one", "two", "three"]
    assert raw(live, "GET", path, params={"limit": 0}).status_code == 400
    assert raw(live, "GET", path, params={"order": "sideways"}).status_code == 400


def test_a_stored_response_survives_a_restart(smollm2_weights: ModelWeights, tmp_path: Path) -> None:
    config = server_config(model=MODEL, responses_db=str(tmp_path / "responses.db"))
    with server_in_thread(smollm2_weights, config) as url, own_client(url) as api:
        first = api.responses.create(model=MODEL, input="Remember me.", max_output_tokens=4, temperature=0)
    with server_in_thread(smollm2_weights, config) as url, own_client(url) as again:
        assert again.responses.retrieve(first.id).model_dump() == first.model_dump()
        chained = again.responses.create(model=MODEL, input="Who?", previous_response_id=first.id, max_output_tokens=2)
        assert chained.usage is not None and first.usage is not None
        assert chained.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


async def test_dropping_a_response_stream_cancels_its_generation(tiny_weights: ModelWeights) -> None:
    body = {"input": "tell me everything", "max_output_tokens": 5000, "stream": True}
    async with running_server(tiny_weights, step_caller=slow_steps(0.05)) as server, server.client() as http:
        async with (
            http.stream("POST", "/v1/responses", json=body) as response,
            aclosing(cast(AsyncGenerator[bytes, None], response.aiter_raw())) as chunks,
        ):
            received = b""
            async for chunk in chunks:
                received += chunk
                if (
                    received.count(b"event: response.reasoning_text.delta\n")
                    + received.count(b"event: response.output_text.delta\n")
                    >= 3
                ):
                    break
        stats = await wait_for_stats(
            http, lambda s: s["cancelled_requests"] == 1 and s["active_sequences"] == 0, server=server
        )
        assert stats["model_metrics"]["tiny-gpt-oss"]["client_disconnects"] == 1
        listing = await http.get("/v1/responses/" + "resp_" + "0" * 32)
        assert listing.status_code == 404  # and nothing half-done was stored: there is no id to ask for


# -- Harmony: the analysis channel is the reasoning item -----------------------------------------
@pytest.fixture
async def harmony_server(tiny_weights: ModelWeights) -> AsyncIterator[RunningServer]:
    async with scripted_server(tiny_weights, THEN_FINAL) as server:
        yield server


async def test_gpt_oss_answers_with_a_reasoning_item_then_a_message(harmony_server: RunningServer) -> None:
    body = {"input": "Is the sky blue?", "max_output_tokens": 30, "temperature": 0, "reasoning": {"effort": "low"}}
    async with harmony_server.client() as http:
        response = (await http.post("/v1/responses", json=body)).json()
        stored = (await http.get(f"/v1/responses/{response['id']}")).json()
    reasoning, message = response["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Thinking about colors."}]
    assert message["type"] == "message" and message["content"][0]["type"] == "output_text"
    usage = response["usage"]
    assert 0 < usage["output_tokens_details"]["reasoning_tokens"] < usage["output_tokens"]
    assert response["reasoning"]["effort"] == "low" and stored == response


async def test_gpt_oss_streams_reasoning_text_events(harmony_server: RunningServer) -> None:
    body = {"input": "Is the sky blue?", "max_output_tokens": 30, "temperature": 0, "stream": True}
    async with harmony_server.client() as http:
        events = sse_events((await http.post("/v1/responses", json=body)).text)
    kinds = [event["type"] for event in events]
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    [done] = [e for e in events if e["type"] == "response.reasoning_text.done"]
    assert reasoning == done["text"] == "Thinking about colors."
    assert done["output_index"] == 0
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1]
    assert events[-1]["response"]["output"][0]["type"] == "reasoning"


async def test_a_store_that_fails_does_not_cost_the_client_its_answer(tiny_weights: ModelWeights) -> None:
    class Broken(SqliteResponseStore):
        def put(self, tenant: str | None, stored: StoredResponse) -> None:
            raise sqlite3.OperationalError("disk I/O error")

    async with running_server(tiny_weights) as server, server.client() as http:
        server.server.state.responses.store = Broken(MEMORY)
        answer = await http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 3})
        assert answer.status_code == 200 and answer.json()["status"] == "incomplete"
        streamed = await http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 3, "stream": True})
        assert sse_events(streamed.text)[-1]["type"] == "response.incomplete"
        # Not stored (the failure is logged as response_store_failed): a retrieve is a 404.
        assert (await http.get(f"/v1/responses/{answer.json()['id']}")).status_code == 404

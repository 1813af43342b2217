"""Every POST route, fuzzed: no body gets a 5xx, and every 4xx is OpenAI's error body (issue 24, item 7).

Breakage caught: a subnormal ``top_p`` (5e-324, 1e-300) is zero in the sampler's float32, which
then kept no token: the only 500 in 1,600 fuzzed bodies. The bodies are each route's own request
(so the fields are real ones) with fields replaced by wrong types, extreme numbers and nested
junk, unknown fields added, or a body that is no object at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.engine.loader import ModelWeights
from app.http.responses_schemas import ResponsesRequest
from app.http.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest
from tests.conftest import server_config, server_in_thread

# A base body per route that the server serves, and the fields its request model reads.
ROUTES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "/generate": ({"prompt": "hi", "max_tokens": 2, "stream": False}, sorted(GenerateRequest.model_fields)),
    "/v1/completions": ({"prompt": "hi", "max_tokens": 2}, sorted(CompletionRequest.model_fields)),
    "/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        sorted(ChatCompletionRequest.model_fields),
    ),
    "/v1/responses": ({"input": "hi", "max_output_tokens": 2, "store": False}, sorted(ResponsesRequest.model_fields)),
}
EXTREME_NUMBERS = [0, -1, 1, 2, 2**31, 2**63, -(2**63) - 1, 2**64, 10**30, 5e-324, 1e-300, 1e-45, -0.0, 1e308, -1e308]

numbers = st.sampled_from(EXTREME_NUMBERS) | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"]) | json_values},
    optional={"content": json_values, "tool_calls": json_values, "tool_call_id": json_values, "name": json_values},
)
field_values = json_values | st.lists(message, max_size=3)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, Any]:
    path = draw(st.sampled_from(sorted(ROUTES)))
    base, fields = ROUTES[path]
    if draw(st.integers(0, 9)) == 0:
        return path, draw(json_values)  # not an object, or an object of anything
    body = dict(base)
    body.update(draw(st.dictionaries(st.sampled_from(fields), field_values, max_size=4)))
    body.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))  # unknown fields, mostly
    return path, body


@pytest.fixture(scope="module")
def fuzz_server(tiny_weights: ModelWeights) -> Iterator[str]:
    # A short context bounds what any body that happens to be valid can ask to generate.
    with server_in_thread(tiny_weights, server_config(max_seq_len=256)) as url:
        yield url


def assert_openai_error(response: httpx.Response) -> None:
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error


@settings(max_examples=120, deadline=None, database=None)
@given(request=requests())
@example(request=("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_p": 5e-324}))
@example(request=("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 1e-300}))
@example(request=("/v1/responses", {"input": "hi", "max_output_tokens": 2, "top_p": 5e-324}))
@example(request=("/generate", {"prompt": "hi", "max_tokens": 2, "stream": False, "top_p": 1e-300}))
def test_no_body_gets_a_5xx_and_every_4xx_is_an_openai_error(fuzz_server: str, request: tuple[str, Any]) -> None:
    path, body = request
    # A body that happens to be valid (a stream, n choices) is bounded by a deadline too.
    headers = {"Content-Type": "application/json", "X-Request-Timeout": "5"}
    with httpx.Client(base_url=fuzz_server, timeout=60) as client:
        response = client.post(path, content=json.dumps(body).encode(), headers=headers)
    assert response.status_code < 500, (path, body, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert_openai_error(response)


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-39])
def test_a_top_p_below_float32s_smallest_normal_is_a_400(fuzz_server: str, top_p: float) -> None:
    with httpx.Client(base_url=fuzz_server, timeout=60) as client:
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "top_p": top_p})
        smallest = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "top_p": 2.0**-126})
    assert response.status_code == 400, response.text
    assert_openai_error(response)
    assert response.json()["error"]["param"] == "top_p"
    assert smallest.status_code == 200, smallest.text  # as greedy as sampling gets, and served


def test_after_the_fuzzing_a_normal_request_is_served(fuzz_server: str) -> None:
    with httpx.Client(base_url=fuzz_server, timeout=30) as client:
        response = client.post("/generate", json={"prompt": "still fine?", "max_tokens": 3, "stream": False})
        stats = client.get("/stats").json()
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    assert stats["active_sequences"] == 0 and stats["model_metrics"]["tiny-gpt-oss"]["active_streams"] == 0

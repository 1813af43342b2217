"""Grammar compiles never stall other requests, and are bounded in count and in time (issue 24, item 5).

Breakage caught: a grammar compiled in the one prompt thread (five slow compiles made a plain
request wait for all of them), a compile nothing could stop, repetition counts nobody bounded.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psutil
import pytest
import trio

from app.contract.grammar import GrammarError, GrammarSpec
from app.contract.model import ServedModel
from app.engine.grammar import GrammarCompiler
from app.engine.loader import ModelWeights
from app.text.repetitions import regex_repetition_error, schema_repetition_error
from tests.conftest import running_server, server_config

# Compiles over gpt-oss's vocabulary for 8 s on an idle 2-core box (38 s on a busy one): far past
# the 0.5 s the timeout test gives it.
SLOW_REGEX = "[^x]{1,5000}"


@pytest.mark.parametrize(
    ("pattern", "refused"),
    [
        ("[a-z]{1,50000}", True),
        ("[a-z]{1,10000}", False),
        ("x{20000,}", True),
        ("(a{1,200}){1,200}", True),  # nested: 40000
        ("(a{1,200}b){1,60}", True),  # 12000
        ("(a{1,200}|b){1,40}", False),  # 8000
        ("[{(]{99999}", True),  # a class's brackets are literal; its count is not
        (r"\{99999}", False),  # an escaped brace is no count
        ("a{99999999999999999999999}", True),
        ("((a{10}){10}){100}", False),
    ],
)
def test_regex_repetition_bound(pattern: str, refused: bool) -> None:
    assert (regex_repetition_error(pattern) is not None) == refused


def test_schema_repetition_bound() -> None:
    assert schema_repetition_error({"properties": {"a": {"type": "string", "maxLength": 50000}}}) is not None
    assert schema_repetition_error({"type": "array", "minItems": 20000}) is not None
    assert schema_repetition_error({"type": "string", "pattern": "[a-z]{1,50000}"}) is not None
    assert schema_repetition_error({"patternProperties": {"^x{99999}$": {}}}) is not None
    assert schema_repetition_error({"enum": [{"maxLength": 50000}]}) is None  # data, not a keyword
    assert schema_repetition_error({"type": "string", "maxLength": 10000}) is None


def tiny_compiler(tiny_weights: ModelWeights, timeout: float) -> GrammarCompiler:
    return GrammarCompiler(tiny_weights.tokenizer, 201088, tiny_weights.stop_token_ids, compile_timeout=timeout)


def test_a_compile_past_the_timeout_is_killed_with_its_worker(tiny_weights: ModelWeights) -> None:
    compiler = tiny_compiler(tiny_weights, timeout=0.5)
    with pytest.raises(GrammarError, match=r"the regex took more than 0.5 s to compile"):
        compiler.check(GrammarSpec("regex", SLOW_REGEX))
    assert compiler.workers.pids == []  # the worker that ran it is gone, not compiling on
    started = time.perf_counter()
    with pytest.raises(GrammarError, match="took more than"):
        compiler.check(GrammarSpec("regex", SLOW_REGEX))  # known: refused at once, nothing compiles
    assert time.perf_counter() - started < 0.2
    compiler.check(GrammarSpec("regex", "[0-9]{3}"))  # a fresh worker serves the next one
    (pid,) = compiler.workers.pids
    assert psutil.pid_exists(pid) and compiler.compilations == 1


def test_two_requests_for_one_grammar_compile_it_once(tiny_weights: ModelWeights) -> None:
    compiler = tiny_compiler(tiny_weights, timeout=30)
    calls: list[str] = []
    real = compiler.workers.compile

    def counted(kind: str, source: str) -> str:
        calls.append(source)
        time.sleep(0.3)  # long enough for the second request to find it underway
        return real(kind, source)

    compiler.workers.compile = counted  # type: ignore[method-assign]
    spec = GrammarSpec("regex", "[a-c]{2}")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: compiler.check(spec), range(2)))
    assert calls == ["[a-c]{2}"] and compiler.compilations == 1


async def test_repetitions_past_the_bound_are_refused_before_any_compile(tiny_weights: ModelWeights) -> None:
    loaded: list[ServedModel] = []

    def keep(model: ServedModel) -> ServedModel:
        loaded.append(model)
        return model

    huge = {"type": "object", "properties": {"xs": {"type": "array", "maxItems": 99999}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": huge}}]
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"guided_regex": "[a-z]{1,50000}"}, "guided_regex", "{1,50000}"),
        ({"structured_outputs": {"json": {"type": "string", "maxLength": 50000}}}, "structured_outputs", "maxLength"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": "required"},
            "tools",
            "Items",
        ),
    ]
    async with running_server(tiny_weights, runner_hook=keep) as server, server.client() as client:
        with trio.fail_after(60):
            for fields, param, said in cases:
                path = "/v1/chat/completions" if "messages" in fields else "/v1/completions"
                body = {"prompt": "hi", "max_tokens": 2, **fields}
                if "messages" in fields:
                    body.pop("prompt")
                response = await client.post(path, json=body)
                assert response.status_code == 400, response.text
                error = response.json()["error"]
                assert error["param"] == param and said in error["message"], error
        grammars = loaded[0].grammars
        assert isinstance(grammars, GrammarCompiler)
        assert grammars.compilations == 0 and grammars.workers.pids == []  # nothing was even started


PLAIN = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "cache": False}


def plain_request(url: str) -> int:
    # A plain request takes well under a second here; its timeout only ends a test that would
    # otherwise wait for the gate (compiles in the prompt thread: it never opens before this returns).
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.post("/v1/completions", json=PLAIN).status_code


async def test_plain_requests_answer_while_grammar_compiles_are_in_flight(tiny_weights: ModelWeights) -> None:
    """Five compiles held in flight (each waits on a gate, as a slow compile would, without
    burning a core) while plain requests come and go: every plain request answers before any
    compile is let go, and then the five answer too. When compiles ran in the prompt thread, a
    plain request waited for every compile ahead of it. (How much a plain request slows beside
    real slow compiles is a figure, not a test: tools/bench_grammar_stall.py measures it.)"""
    compiling, gate = threading.Semaphore(0), threading.Event()

    def gated_compiles(model: ServedModel) -> ServedModel:
        grammars = model.grammars
        assert isinstance(grammars, GrammarCompiler)
        real = grammars.workers.compile

        def gated(kind: str, source: str) -> str:
            compiling.release()
            gate.wait(60)
            return real(kind, source)

        grammars.workers.compile = gated  # type: ignore[method-assign]
        return model

    config = server_config(cache_max_entries=0)
    async with running_server(tiny_weights, config, runner_hook=gated_compiles) as server:
        with trio.fail_after(120):

            def constrained(i: int) -> int:
                body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "guided_regex": f"[a-z]{{{i + 1}}}"}
                with httpx.Client(base_url=server.url, timeout=90) as client:
                    return client.post("/v1/completions", json=body).status_code

            statuses: list[int] = []
            try:
                async with trio.open_nursery() as nursery:

                    async def run(i: int) -> None:
                        statuses.append(await trio.to_thread.run_sync(constrained, i))

                    for i in range(5):
                        nursery.start_soon(run, i)
                    for _ in range(4):  # four of the five compile (the grammar pool's threads), one waits
                        assert await trio.to_thread.run_sync(lambda: compiling.acquire(timeout=30))
                    plain = [await trio.to_thread.run_sync(plain_request, server.url) for _ in range(3)]
                    assert plain == [200] * 3 and statuses == []  # answered while every compile was held
                    gate.set()
            finally:
                gate.set()  # never leave a compile thread waiting on a failed test
    assert statuses == [200] * 5

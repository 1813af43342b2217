"""Bad input, overload, deadlines, faults, slow and vanished clients, shutdown."""

from __future__ import annotations

import collections
import dataclasses
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from app.engine.loader import ModelWeights
from app.http.request_scope import RequestScopeMiddleware, on_request_close
from app.prompts.harmony_encoding import harmony_encoding
from tests.conftest import RunningServer, app_process, running_server, server_config
from tests.fakes import slow_steps, with_faults

ROOT = Path(__file__).resolve().parent.parent


# -- deadlines, heartbeats, faults -------------------------------------------------------------------
async def test_a_request_past_its_deadline_ends_with_timeout(tiny_server: RunningServer) -> None:
    async with tiny_server.client() as client:
        by_body = await client.post(
            "/generate", json={"prompt": "x", "max_tokens": 8000, "timeout": 0.3, "stream": False}
        )
        by_header = await client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 8000}, headers={"X-Request-Timeout": "0.3"}
        )
        bad_header = await client.post("/generate", json={"prompt": "x"}, headers={"X-Request-Timeout": "soon"})
        stats = (await client.get("/stats")).json()
    assert by_body.json()["finish_reason"] == "timeout" and by_body.json()["usage"]["completion_tokens"] < 8000
    assert by_header.json()["choices"][0]["finish_reason"] == "timeout"
    assert bad_header.status_code == 400 and bad_header.json()["error"]["param"] == "X-Request-Timeout"
    assert stats["active_sequences"] == 0


async def test_idle_streams_get_heartbeats(tiny_weights: ModelWeights) -> None:
    config = server_config(heartbeat_seconds=0.05)
    async with running_server(tiny_weights, config, step_caller=slow_steps(0.3)) as server, server.client() as client:
        response = await client.post("/generate", json={"prompt": "x", "max_tokens": 2})
    assert response.status_code == 200
    body = response.text
    assert ": keep-alive" in body
    assert body.index(": keep-alive") < body.index("event: token"), "heartbeats while the prompt is prefilled"
    assert body.rstrip().split("\n\n")[-1].startswith("event: done")


async def test_failing_steps_turn_health_degraded_until_one_succeeds(tiny_weights: ModelWeights) -> None:
    marker = harmony_encoding().encode("FAILNOW", allowed_special="all")
    hook = with_faults(marker, lambda: RuntimeError("device-side assert triggered"))
    async with running_server(tiny_weights, runner_hook=hook) as server, server.client() as client:
        for _ in range(3):
            failed = await client.post("/generate", json={"prompt": "FAILNOW", "max_tokens": 3, "stream": False})
            assert failed.status_code == 500
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert health.json()["failing_steps"] == 3
        ok = await client.post("/generate", json={"prompt": "fine", "max_tokens": 3, "stream": False})
        assert ok.status_code == 200
        assert (await client.get("/health")).json()["status"] == "ok"


async def test_an_error_mid_stream_ends_with_an_error_event(tiny_weights: ModelWeights) -> None:
    """The fault hits each request's third decode step: the stream has started, so /generate must
    end with ``event: error`` and the chat stream with an OpenAI error chunk, then ``[DONE]``.

    Breakage caught: either framer dropping its error (the stream ends on its last token, or the
    chat stream closes without the error chunk), or [DONE] missing after it.
    """

    def decode_fault(loaded: Any) -> Any:
        runner = loaded.runner
        real_decode = runner.decode
        decodes: collections.Counter[str] = collections.Counter()

        def decode(seq_ids: Any, must_continue: Any = ()) -> Any:
            ids = list(seq_ids)
            decodes.update(ids)
            if any(decodes[seq_id] == 3 for seq_id in ids):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real_decode(ids, must_continue)

        runner.decode = decode
        return loaded

    async with running_server(tiny_weights, runner_hook=decode_fault) as server, server.client() as client:
        response = await client.post("/generate", json={"prompt": "x", "max_tokens": 50})
        chat = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 50, "stream": True},
        )
    events = [block for block in response.text.strip().split("\n\n") if block]
    assert events[0].startswith("event: start") and events[-1].startswith("event: error")
    assert '"code":"step_failed"' in events[-1] and "illegal memory access" not in events[-1]
    assert sum(e.startswith("event: token") for e in events) == 3  # the prefill's token and two decodes
    assert chat.status_code == 200
    lines = [block.removeprefix("data: ") for block in chat.text.strip().split("\n\n") if block]
    assert lines[-1] == "[DONE]"
    error = json.loads(lines[-2])["error"]
    assert error["code"] == "step_failed" and error["type"] == "server_error"
    assert "illegal memory access" not in error["message"], "the exception's text stays in the log"
    chunks = [json.loads(line) for line in lines[:-2]]
    assert chunks and all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert not any(choice.get("finish_reason") for chunk in chunks for choice in chunk["choices"])


# -- slow clients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shielded", [False, True], ids=["cancellable send (HTTP/2)", "shielded send (HTTP/1.1)"])
async def test_a_client_that_stops_reading_is_dropped_after_the_stall_timeout(
    autojump_clock: object, shielded: bool
) -> None:
    """Hypercorn waits on HTTP/2's flow-control window (a cancel reaches it) but shields its
    HTTP/1.1 socket write (a cancel waits for the write, which for a client that never reads is
    never): both must end the request's work within the stall timeout.

    Breakage caught: the guard that only cancels the send (it never fired on HTTP/1.1)."""
    closed: list[str] = []
    client_reads = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        on_request_close(scope, closed.append)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})

    sent: list[Any] = []

    async def stuck_client_send(message: Any) -> None:
        if len(sent) >= 3:  # the socket's buffers are full: the client stopped reading
            if shielded:
                await trio.lowlevel.checkpoint()  # Hypercorn takes its send lock first
                with trio.CancelScope(shield=True):
                    await client_reads.wait()
            else:
                await trio.sleep_forever()
        sent.append(message)

    middleware = RequestScopeMiddleware(app, stall_timeout=5.0)
    start = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            scope: Any = {"type": "http", "path": "/generate"}
            nursery.start_soon(middleware, scope, trio.sleep_forever, stuck_client_send)
            with trio.move_on_after(30):
                while not closed:
                    await trio.sleep(0.1)
            stopped_after = trio.current_time() - start
            client_reads.set()  # the shielded write completes: the cancelled request then ends
            nursery.cancel_scope.cancel()
    assert closed == ["stalled"]
    assert 5.0 <= stopped_after < 6.5


# -- shutdown ----------------------------------------------------------------------------------------
async def test_sigterm_drains_then_ends_running_streams_with_shutdown() -> None:
    events: list[str] = []
    async with app_process("--model", "tiny-gpt-oss", "--drain-timeout", "2") as (process, url):
        with trio.fail_after(120):
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                while (await client.get("/health")).json()["status"] != "ok":
                    await trio.sleep(0.1)

                async def long_stream() -> None:
                    body = {"prompt": "x", "max_tokens": 8000, "cache": False}
                    async with client.stream("POST", "/generate", json=body) as response:
                        async for line in response.aiter_lines():
                            events.append(line)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(long_stream)
                    while sum(line.startswith("event: token") for line in events) < 3:
                        await trio.sleep(0.02)
                    process.send_signal(signal.SIGTERM)
                    await trio.sleep(0.3)
                    health = await client.get("/health")
                    refused = await client.post("/generate", json={"prompt": "x", "max_tokens": 2, "stream": False})
            code = await process.wait()
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert refused.status_code == 503
    done = [json.loads(line[6:]) for line in events if line.startswith("data: ") and "finish_reason" in line]
    assert done and done[-1]["finish_reason"] == "shutdown"
    assert code == 0


def test_config_replace_keeps_validation() -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(server_config(), stall_timeout=0)

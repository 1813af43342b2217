"""A client that stops reading is aborted within --stall-timeout, on HTTP/1.1 and HTTP/2.

Each client here sends one streaming request and then never reads a byte from its socket (a
small receive buffer, so the server's writes soon block): raw HTTP/1.1, and raw HTTP/2 with the
large window httpx grants. Hypercorn's HTTP/1.1 write is shielded from cancellation; on HTTP/2 the
app's send waits for Hypercorn's stream buffer to drain, which it cannot while its writer is stuck
on the socket. Either way the server must stop the generation once a send has hung for the stall
timeout, and say why (abort reason ``stalled``).

Breakage caught: a stall guard that only cancels the send (it never fires on HTTP/1.1, where the
generation then runs on until its relay's buffer fills, or forever behind a cache flight).
"""

from __future__ import annotations

import io
import json
import socket
from typing import Any

import h2.config
import h2.connection
import h2.settings
import httpx
import pytest
import trio

from app.engine.loader import ModelWeights
from tests.conftest import RunningServer, running_server, server_config, wait_for_stats
from tests.test_observability import json_log

STALL_SECONDS = 1.0
BODY = {
    "messages": [{"role": "user", "content": "tell me everything"}],
    "max_tokens": 4000,
    "stream": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},  # bigger chunks
    "cache": False,
}


def address(server: RunningServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def http1_request(server: RunningServer) -> socket.socket:
    body = json.dumps(BODY).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(address(server))
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def http2_request(server: RunningServer) -> socket.socket:
    body = json.dumps(BODY).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(address(server))
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    # A window as httpx grants (16 MiB): the server may send far more than the socket buffers hold,
    # so its writer blocks on the socket, as it does for a real client whose reader stopped.
    connection.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**24 - 1}
    )
    connection.initiate_connection()
    headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":scheme", "http"),
        (":authority", "test"),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
    ]
    connection.send_headers(1, headers)
    connection.send_data(1, body, end_stream=True)
    sock.sendall(connection.data_to_send())
    return sock


@pytest.mark.parametrize("request_over", [http1_request, http2_request], ids=["HTTP/1.1", "HTTP/2"])
async def test_a_client_that_stops_reading_is_aborted_as_stalled(tiny_weights: ModelWeights, request_over: Any) -> None:
    log = io.StringIO()
    with json_log(log):
        async with running_server(tiny_weights, server_config(stall_timeout=STALL_SECONDS)) as server:
            sock = request_over(server)
            try:
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                    with trio.fail_after(60):
                        stats = await wait_for_stats(
                            client, lambda s: s["cancelled_requests"] == 1 and s["active_sequences"] == 0, 60, server
                        )
            finally:
                sock.close()
    lines = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    assert any(line["event"] == "client_stalled" for line in lines), "the HTTP layer saw the send hang"
    (cancelled,) = [line for line in lines if line["event"] == "cancelled"]
    assert cancelled["abort_reason"] == "stalled", cancelled
    figures = stats["model_metrics"]["tiny-gpt-oss"]
    assert figures["tokens"]["completion"] < BODY["max_tokens"], "the generation stopped"
    assert figures["client_disconnects"] == 0, "a stall, not a disconnect"

"""A finished HTTP/1.x request lets go of its connection (issue 24, item 3).

Breakage caught: quart-trio cancels a request on the ``http.disconnect`` that Hypercorn hands it
inside the response's last send, and the cancel landed in Hypercorn's own close: no socket was
ever closed (``Connection: close``, HTTP/1.0) and a kept-alive one never started its idle timer.
1,000 finished connections stayed open, one server fd each.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator

import psutil
import pytest

from app import cli
from app.engine.loader import ModelWeights
from tests.conftest import server_in_thread

KEEP_ALIVE_SECONDS = 1.0


@pytest.fixture(scope="module")
def address(tiny_weights: ModelWeights) -> Iterator[tuple[str, int]]:
    """One in-process server (so psutil counts its fds) with a short keep-alive timeout."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "KEEP_ALIVE_SECONDS", KEEP_ALIVE_SECONDS)
        with server_in_thread(tiny_weights) as url:
            host, port = url.removeprefix("http://").rsplit(":", 1)
            yield host, int(port)


def server_sockets(port: int) -> int:
    """The fds of the server's side of its connections (the server runs in this process)."""
    return sum(
        1
        for conn in psutil.Process().net_connections("tcp")
        if conn.laddr and conn.laddr.port == port and conn.status != psutil.CONN_LISTEN
    )


def read_response(sock: socket.socket) -> bytes:
    """One whole response (the server's JSON has a Content-Length), leaving the socket open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += sock.recv(65536)
    return head


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float | None]:
    """Everything the server sends, and how long after the call it closed (None: it did not)."""
    sock.settimeout(within)
    started, data = time.perf_counter(), b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, None
    return data, time.perf_counter() - started


def test_a_thousand_connection_close_requests_leave_no_fd_behind(address: tuple[str, int]) -> None:
    """The clients keep their ends open, as one reading to EOF would: only the server can close."""
    before = server_sockets(address[1])
    clients: list[socket.socket] = []
    try:
        for _ in range(1000):
            sock = socket.create_connection(address, timeout=10)
            clients.append(sock)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 6
        while (now := server_sockets(address[1])) > before + 50 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for sock in clients:
            sock.close()
    assert now <= before + 50, f"server sockets {before} -> {now}"


@pytest.mark.parametrize(
    "head",
    [b"GET /health HTTP/1.0\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"],
    ids=["http-1.0", "connection-close"],
)
def test_the_server_closes_the_socket_after_the_response(address: tuple[str, int], head: bytes) -> None:
    with socket.create_connection(address) as sock:
        sock.sendall(head)
        data, closed_after = read_until_closed(sock, within=KEEP_ALIVE_SECONDS * 3)
    assert data.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), data[:40]
    # At once: well before the keep-alive timer could have closed it.
    assert closed_after is not None and closed_after < KEEP_ALIVE_SECONDS / 2, closed_after


def test_a_kept_alive_connection_serves_again_then_closes_when_idle(address: tuple[str, int]) -> None:
    connection = http.client.HTTPConnection(*address, timeout=10)
    for _ in range(2):  # the same socket serves a second request: it was kept alive
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Connection") is None
        response.read()
    assert connection.sock is not None
    _, closed_after = read_until_closed(connection.sock, within=KEEP_ALIVE_SECONDS * 4)
    connection.close()
    assert closed_after is not None and KEEP_ALIVE_SECONDS / 2 < closed_after < KEEP_ALIVE_SECONDS * 3, closed_after

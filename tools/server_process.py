"""Start ``python -m app`` in a subprocess for a tool or a test, and wait until it serves."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def app_server(
    *args: str, ready_timeout: float = 600.0, log_path: Path | None = None, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Yield the base URL of a freshly started server; SIGTERM it afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "app", "--port", str(port), "--log-level", "warning", *args]
    with command_server(command, port, ready_timeout=ready_timeout, log_path=log_path, env=env) as url:
        yield url


@contextlib.contextmanager
def command_server(
    command: Sequence[str],
    port: int,
    *,
    ready_timeout: float = 600.0,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Run a server COMMAND that listens on 127.0.0.1:PORT (this server, or another one to compare
    with); yield its base URL once GET /health answers 200; SIGTERM it afterwards. ENV is added to
    this process's environment; stdout and stderr go to LOG_PATH (or nowhere)."""
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        list(command),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, ready_timeout)
        yield url
    finally:
        stop(process)
        if log_path:
            log.close()  # type: ignore[union-attr]


def listening_url(line: str) -> str | None:
    """The URL in ``python -m app``'s JSON ``listening`` log line; None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return str(event["urls"][0]) if event.get("event") == "listening" else None


@dataclass
class ServerLog:
    """The server's JSON log lines as they come (read in a thread, so its stderr never fills up),
    and the URL from its ``listening`` line."""

    lines: list[str] = field(default_factory=list)
    url: str | None = None
    listening: threading.Event = field(default_factory=threading.Event)

    def read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if self.url is None and (url := listening_url(line)) is not None:
                self.url = url
                self.listening.set()
        self.listening.set()  # end of output: whoever waits for the URL stops waiting

    def tail(self, count: int = 20) -> str:
        return "\n".join(self.lines[-count:])


@dataclass(frozen=True)
class ServedApp:
    url: str
    log: ServerLog


@contextlib.contextmanager
def app_on_port_zero(*args: str, ready_timeout: float = 600.0) -> Iterator[ServedApp]:
    """Serve ``python -m app ARGS`` on a port the OS picks (no race between choosing a free port
    and binding it), wait until /health says ready, and SIGTERM it afterwards."""
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", "0", "--log-format", "json", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    log = ServerLog()
    reader = threading.Thread(target=log.read, args=(process.stderr,), name="server-log", daemon=True)
    reader.start()
    try:
        log.listening.wait(ready_timeout)
        if log.url is None:
            raise RuntimeError(f"the server did not say where it listens; its log ends:\n{log.tail()}")
        wait_ready(log.url, process, ready_timeout)
        yield ServedApp(log.url, log)
    finally:
        stop(process)
        reader.join(timeout=10)  # the process is gone: its stderr ends
        process.stderr.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains and exits), then SIGKILL if it has not gone within a minute."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_ready(url: str, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {timeout} s")

"""A real redis-server (Debian's package) on a free loopback port, for the tests of the shared
stores and of replicas; stopped and started again on the same port to play an outage.

Without /usr/bin/redis-server the tests skip, except in CI (``make redis-deps`` installs it, and
``make test`` runs that first), where they must run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tools.server_process import free_port

REDIS_SERVER = Path("/usr/bin/redis-server")


def require_redis_server() -> None:
    if not REDIS_SERVER.exists():
        message = f"{REDIS_SERVER} is missing: `make redis-deps` installs Debian's redis-server"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class RedisServer:
    """One redis-server process at a time on ``port``; nothing saved to disk."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", str(self.folder), "--maxmemory", "64mb"]
        command += ["--maxmemory-policy", "allkeys-lru"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.process.returncode}")
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            time.sleep(0.05)
        raise TimeoutError("redis-server did not answer within 20 s")

    def kill(self) -> None:
        """SIGKILL: an outage, not a goodbye (nothing is flushed, connections just drop)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        wait_port_closed(self.port)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def flush(self) -> None:
        self.client().flushall()


def wait_port_closed(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.05)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    require_redis_server()
    with tempfile.TemporaryDirectory(prefix="gptoss-redis-") as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            yield server
        finally:
            server.kill()

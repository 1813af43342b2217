"""Shared fixtures: model weights loaded once per session, and a real in-process server."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio
from hypercorn.trio import serve

from actors.step_thread import StepCaller
from app.cli import hypercorn_config
from app.config import PROFILES, ModelSettings, ServerConfig
from app.contract.model import ServedModel
from app.engine.loader import ModelWeights, load_weights, serve_weights
from app.logging_setup import configure_logging
from app.models.registry import resolve
from app.server import Server, create_server
from tools.server_process import listening_url

# A test that needed its rerun fails the run (see tests/rerun_guard.py).
pytest_plugins = ["tests.rerun_guard"]


@functools.cache
def weights(name: str) -> ModelWeights:
    """Loaded once per test session; every server gets its own runner over them."""
    return load_weights(resolve(name), dtype="float32", device="cpu")


# What a test that serves weights by hand gets: no prefix KV cache unless it asks for one.
BARE = ModelSettings(prefix_cache_bytes=0)


@pytest.fixture(scope="session")
def tiny_weights() -> ModelWeights:
    return weights("tiny-gpt-oss")


@pytest.fixture(scope="session")
def smollm2_weights() -> ModelWeights:
    return weights("smollm2-135m")


@dataclass
class RunningServer:
    url: str
    server: Server

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30.0, **kwargs)  # type: ignore[arg-type]


def server_config(**overrides: object) -> ServerConfig:
    profile = dataclasses.replace(PROFILES["latency_first"], max_batch_size=8, max_queue=16)
    fields: dict[str, object] = {
        "model": "tiny-gpt-oss",
        "port": 0,
        "profile": profile,
        "log_level": "warning",
        "responses_db": ":memory:",  # no test server writes the user's cache folder
        # The prefix cache's pool is zero-filled at start-up: the default GiB would cost every
        # test server a second or two; this is thousands of the tiny models' blocks.
        "prefix_cache_bytes": 64 * 1024 * 1024,
    }
    fields.update(overrides)
    return ServerConfig(**fields)  # type: ignore[arg-type]


@asynccontextmanager
async def running_server(
    model_weights: ModelWeights,
    config: ServerConfig | None = None,
    *,
    step_caller: StepCaller | None = None,
    runner_hook: Callable[[ServedModel], ServedModel] | None = None,
    wait_for_model: bool = True,
    on_fatal: Callable[[str], None] | None = None,
    before_load: Callable[[], object] | None = None,
    wrap_asgi: Callable[[Any], Any] | None = None,
) -> AsyncIterator[RunningServer]:
    """A real Hypercorn (trio worker) on 127.0.0.1, port 0, serving the app in this event loop."""
    config = config or server_config()

    def load() -> ServedModel:
        if before_load is not None:
            before_load()  # e.g. block, to see the server while it is loading
        loaded = serve_weights(model_weights, config, max_batch_size=config.profile.max_batch_size)
        return runner_hook(loaded) if runner_hook else loaded

    server = create_server(
        config, loader=load, step_caller=step_caller, wait_for_model=wait_for_model, on_fatal=on_fatal
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        app = wrap_asgi(server.asgi) if wrap_asgi is not None else server.asgi
        binds = await nursery.start(
            functools.partial(serve, app, hypercorn_config(config), shutdown_trigger=shutdown.wait)
        )
        try:
            yield RunningServer(binds[0], server)
        finally:
            shutdown.set()
            nursery.cancel_scope.deadline = trio.current_time() + 10


@contextlib.contextmanager
def server_in_thread(model_weights: ModelWeights, config: ServerConfig | None = None) -> Iterator[str]:
    """A real server on its own trio loop in a thread, for synchronous tests (hypothesis, or
    one server shared by a module's tests: pytest-trio fixtures are function-scoped)."""
    config = config or server_config()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        loaded = serve_weights(model_weights, config, max_batch_size=config.profile.max_batch_size)
        server = create_server(config, loader=lambda: loaded)
        shutdown = trio.Event()
        state["stop"] = shutdown.set
        state["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            serving = functools.partial(serve, server.asgi, hypercorn_config(config), shutdown_trigger=shutdown.wait)
            binds = await nursery.start(serving)
            state["url"] = binds[0]
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(120), "the server did not start"
    try:
        yield state["url"]
    finally:
        trio.from_thread.run_sync(state["stop"], trio_token=state["token"])
        thread.join(30)


async def stream_then_drop(client: httpx.AsyncClient, body: dict[str, object], tokens: int) -> int:
    """Start a /generate stream, read ``tokens`` token events, then close the connection."""
    received = b""
    # aiter_raw is one generator; httpx's text iterators nest several that aclosing cannot reach.
    async with (
        client.stream("POST", "/generate", json=body) as response,
        aclosing(cast(AsyncGenerator[bytes, None], response.aiter_raw())) as chunks,
    ):
        async for chunk in chunks:
            received += chunk
            if received.count(b"event: token\n") >= tokens:
                break
    return received.count(b"event: token\n")


async def wait_for_stats(
    client: httpx.AsyncClient,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 10.0,
    server: RunningServer | None = None,
) -> dict[str, Any]:
    """Poll /stats until ``predicate`` holds; past ``timeout`` fail with the last body seen and,
    given the in-process ``server``, what its pipeline held: which side lost track shows at once."""
    last: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while True:
            last = (await client.get("/stats")).json()
            if predicate(last):
                return last
            await trio.sleep(0.02)
    inside = ""
    if server is not None:
        pipeline = server.server.pipeline
        scheduler = pipeline.scheduler.stats if pipeline.scheduler is not None else None
        inside = (
            f"; pipeline: streams={pipeline.active_streams} relays={pipeline.active_relays} "
            f"tasks={pipeline.task_count} scheduler={scheduler} requests={pipeline.metrics.book.requests}"
        )
    raise AssertionError(f"/stats did not get there within {timeout} s; last seen: {json.dumps(last)}{inside}")


ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def app_process(*args: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """``python -m app ... --port 0 --log-format json`` in a subprocess: yields it and its URL once it
    listens, and kills it afterwards if the test did not end it."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "app", *args, "--port", "0", "--log-format", "json"], cwd=ROOT, stderr=subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        buffer = b""
        url = None
        with trio.fail_after(120):
            while url is None:
                chunk = await process.stderr.receive_some()
                assert chunk, "the server exited before listening"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    url = url or listening_url(line.decode(errors="replace"))
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


@pytest.fixture
async def tiny_server(tiny_weights: ModelWeights) -> AsyncIterator[RunningServer]:
    async with running_server(tiny_weights) as running:
        yield running


def pytest_configure(config: pytest.Config) -> None:
    configure_logging("warning", "console")

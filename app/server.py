"""The wiring: the one module that knows every layer and connects them.

It builds the pipeline over the engine's loader (the actors never import the engine), the Quart
(quart-trio) application with its error handlers, and registers the routes with what they need
(``ServerState``: the routes do not import this module). The pipeline's actors start in the app's
lifespan nursery (``before_serving``) and stop in ``after_serving``; the ASGI callable that
Hypercorn serves is the app wrapped in RequestScopeMiddleware, which ties each request's work to
the request's life.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import structlog
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors.metrics_events import RedisError
from actors.pipeline import Pipeline
from actors.shared_cache import RedisSharedCache, SharedCache
from actors.step_thread import StepCaller
from app import __version__
from app.cache.redis_store import RedisCacheStore
from app.config import ConfigError, ServerConfig
from app.contract.model import ServedModel
from app.engine.runtime_info import gpu_memory, runtime_info
from app.http import generate_routes, openai_routes, ops_routes, playground_routes, responses_routes
from app.http.access import ApiKeys, cors_headers
from app.http.context import ServerState
from app.http.errors import ApiError, error_body, error_response
from app.http.json_response import json_response
from app.http.request_scope import RequestScopeMiddleware
from app.http.response_store import AsyncResponseStore
from app.store.reasoning_seal import ReasoningSeal, kept_secret
from app.store.redis_link import RedisLink, connect, redacted
from app.store.redis_responses import RedisResponseStore
from app.store.responses import MEMORY, ResponseBackend, SqliteResponseStore, StoreLimits

log = structlog.get_logger("server")
BODY_TIMEOUT_SECONDS = 30
# Redis calls of the response store at once (its client is a thread-safe pool; SQLite has one
# connection: one call at a time).
REDIS_STORE_CONCURRENCY = 4


def default_loader(config: ServerConfig) -> Callable[[], ServedModel]:
    from app.engine.loader import load_model
    from app.models.registry import resolve

    source = resolve(config.model, config.served_model_name)

    def load() -> ServedModel:
        return load_model(source, config, max_batch_size=config.profile.max_batch_size)

    return load


def run_follower(config: ServerConfig) -> int:
    """A rank > 0 of a tensor-parallel server: load this rank's shard, then run the steps rank 0
    sends until it says stop. No HTTP, no actors. Returns the exit code."""
    from app.engine import tensor_parallel
    from app.engine.loader import BaseRunner, ModelLoadError

    try:
        runner = default_loader(config)().runner
    except ModelLoadError as error:
        log.error("model_load_failed", error=str(error))
        return 1
    group = tensor_parallel.joined()
    assert group is not None and isinstance(runner, BaseRunner)  # loaded with tensor_parallel_size > 1
    return tensor_parallel.serve_follower(runner, group)


def stop_tensor_parallel(server: Server, exit_code: int) -> NoReturn:
    """Rank 0 is done serving: the followers stop, then this process exits with ``exit_code`` (1
    if a follower is lost)."""
    from app.engine.tensor_parallel import LeaderBackend, leave

    model = server.pipeline.model
    if model is not None and isinstance(model.runner, LeaderBackend):
        model.runner.stop()
    leave(exit_code)


def response_store(config: ServerConfig, redis: RedisLink | None = None) -> ResponseBackend:
    """The /v1/responses store: Redis' when replicas share one; else --responses-db, or
    responses.db beside the locally built models."""
    limits = StoreLimits(config.responses_max_count, config.responses_max_bytes, config.responses_ttl)
    if redis is not None:
        return RedisResponseStore(redis, limits)
    from app.models.local_builds import cache_root  # torch: loaded only when the wiring runs

    return SqliteResponseStore(config.responses_db or cache_root() / "responses.db", limits)


def reasoning_seal(config: ServerConfig) -> ReasoningSeal:
    """The seal of reasoning items' encrypted_content: the configured secret; else one kept in
    reasoning.key beside the SQLite store (the cache folder's with Redis: replicas then need a
    shared --reasoning-key, or each opens only its own blobs); with ``:memory:`` one for this
    process alone, as nothing else is kept either."""
    if config.reasoning_key is not None:
        return ReasoningSeal(config.reasoning_key.encode())
    if config.redis_url is None and config.responses_db == MEMORY:
        return ReasoningSeal.ephemeral()
    from app.models.local_builds import cache_root  # torch: loaded only when the wiring runs

    if config.redis_url is None and config.responses_db is not None:
        folder = Path(config.responses_db).parent
    else:
        folder = cache_root()
    if config.redis_url is not None:
        log.warning("reasoning_key_local", folder=str(folder), hint="replicas need one --reasoning-key")
    try:
        return ReasoningSeal(kept_secret(folder))
    except OSError as error:
        raise ConfigError(f"the reasoning key cannot be kept: {error}") from None


def model_namespace(config: ServerConfig, model: ServedModel) -> str:
    """What names the model as it computes, in the shared cache's keys: replicas that serve the
    same model the same way share answers; another model, size or dtype (or a CPU and a GPU,
    whose greedy answers may differ) never gets them. The device's index is left out: replicas
    on cuda:0 and cuda:1 compute alike."""
    device_type = model.device.partition(":")[0]
    return json.dumps([config.model, model.model_id, model.model_size, model.dtype, device_type])


def shared_cache(
    config: ServerConfig, link: RedisLink, report: Callable[[str], None]
) -> Callable[[ServedModel], SharedCache]:
    """The prompt cache's Redis tier, made once the model is loaded (its identity is in the keys)."""

    def make(model: ServedModel) -> SharedCache:
        store = RedisCacheStore(link, model_namespace(config, model), config.redis_cache_ttl, config.cache_max_bytes)
        return RedisSharedCache(store, report)

    return make


@dataclass(slots=True)
class Server:
    app: QuartTrio
    asgi: RequestScopeMiddleware
    state: ServerState

    @property
    def pipeline(self) -> Pipeline:
        return self.state.pipeline


def create_server(
    config: ServerConfig,
    *,
    loader: Callable[[], ServedModel] | None = None,
    step_caller: StepCaller | None = None,
    wait_for_model: bool = True,
    on_fatal: Callable[[str], None] | None = None,
) -> Server:
    """Build the app. ``wait_for_model``: start-up waits for the model (a failed load fails it);
    otherwise the server answers at once, /health says ``loading``, and ``on_fatal`` hears a
    failed load."""
    link: RedisLink | None = None
    if config.redis_url is not None:
        link = RedisLink(connect(config.redis_url, config.redis_timeout), name=redacted(config.redis_url))
        log.info("redis", url=link.name, cache_ttl_s=config.redis_cache_ttl, timeout_s=config.redis_timeout)
    pipeline: Pipeline

    def report_redis_error(op: str) -> None:
        pipeline.metrics.report(RedisError(op))

    pipeline = Pipeline(
        loader or default_loader(config),
        config,
        step_caller=step_caller,
        gpu_memory=gpu_memory,
        on_fatal=on_fatal,
        shared_cache=None if link is None else shared_cache(config, link, report_redis_error),
    )
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # streams may run for minutes; disconnects end them
    # A request body (4 MiB at most) that takes longer than this to arrive is refused: a client
    # that trickles one cannot hold a request open for minutes.
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_SECONDS
    responses = AsyncResponseStore(
        response_store(config, link),
        concurrency=1 if link is None else REDIS_STORE_CONCURRENCY,
        report=report_redis_error,
    )
    state = ServerState(config, pipeline, __version__, runtime_info, gpu_memory, responses, reasoning_seal(config))
    app.extensions["gptoss"] = state

    @app.before_serving
    async def start_pipeline() -> None:
        await app.nursery.start(functools.partial(pipeline.run, wait_for_model=wait_for_model))

    @app.after_serving
    async def stop_pipeline() -> None:
        await pipeline.stop()
        await responses.close()
        if link is not None:
            link.close()

    keys = ApiKeys(config.api_keys)

    @app.before_request
    async def authorize() -> None:
        # A CORS preflight carries no credentials by design; it reaches no endpoint's work.
        if request.method != "OPTIONS":
            g.tenant = keys.tenant(request.path, request.headers.get("Authorization"))

    @app.after_request
    async def cross_origin(response: Response) -> Response:
        preflight = request.method == "OPTIONS"
        response.headers.update(cors_headers(request.headers.get("Origin"), config.allowed_origins, preflight))
        return response

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        messages = {
            404: "no such endpoint",
            405: "method not allowed on this endpoint",
            413: f"the request body is over the limit of {config.max_body_bytes} bytes",
        }
        body = error_body(status, messages.get(status, error.description or error.name))
        response = json_response(body, status)
        if status == 413:
            # The rest of the body is still on the wire: this connection cannot carry another request.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    async def unexpected_error(error: Exception) -> Response:
        log.exception("unhandled_error", error=repr(error))
        body = error_body(500, f"internal error: {type(error).__name__}")
        return json_response(body, 500)

    generate_routes.register(app, state)
    openai_routes.register(app, state)
    responses_routes.register(app, state)
    ops_routes.register(app, state)
    playground_routes.register(app)
    asgi = RequestScopeMiddleware(app, stall_timeout=config.stall_timeout, max_open=config.max_connections)
    return Server(app, asgi, state)

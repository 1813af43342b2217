"""The ASGI app for the plain Hypercorn CLI: ``hypercorn --config hypercorn.toml app.asgi:app``.

Hypercorn imports this module and takes ``app``; the model and settings come from environment
variables (the CLI has no flags of ours): each flag of ``python -m app`` has one, named after it
(``--max-batch-size 32``: GPTOSS_MAX_BATCH_SIZE=32; a switch: GPTOSS_CUDA_GRAPHS=1), read the
same way, except --host, --port, --drain-timeout (Hypercorn's own) and the tensor-parallel flags
(one process). An unset or empty variable keeps the flag's default (app.config declares both).

The model loads during start-up: Hypercorn accepts connections once it is ready, and a model that
cannot load fails start-up. If the pipeline dies later (an actor's fault), the process exits with
status 1 a moment after the open streams got their error event, for the supervisor to restart it
(Hypercorn's CLI gives the app no way to stop it with a status of its own).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping

from app.config import ServerConfig
from app.config.declare import values_from_env
from app.logging_setup import configure_logging
from app.server import create_server


def config_from_env(env: Mapping[str, str] = os.environ) -> ServerConfig:
    return ServerConfig(**values_from_env(ServerConfig, env))


# Seconds between a fatal pipeline failure and the exit: the open streams' error events go out.
EXIT_GRACE_SECONDS = 2.0


def exit_soon(message: str) -> None:
    print(f"error: {message}; exiting in {EXIT_GRACE_SECONDS:.0f} s", file=sys.stderr, flush=True)
    threading.Timer(EXIT_GRACE_SECONDS, os._exit, args=(1,)).start()


_config = config_from_env()
configure_logging(_config.log_level, _config.log_format)
app = create_server(_config, wait_for_model=True, on_fatal=exit_soon).asgi

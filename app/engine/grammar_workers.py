"""Grammar compiles in worker processes of their own, each bounded in time (--grammar-compile-timeout).

Why processes and not threads: xgrammar compiles in C++ and nothing interrupts it. A thread that
runs a compile keeps its core and its place in the pool until the compile ends, however long
after its client got the 400; a few slow grammars would then hold every place, and every grammar
request behind them would wait out the timeout in turn. A process can be killed: past the
timeout the worker goes with its compile, its place is free at once and a fresh worker takes it.

Workers fork from a forkserver that imported xgrammar once (a fork takes milliseconds; the import
seconds), start on first use, and never touch the accelerator. A compiled grammar comes back as
xgrammar's JSON and is rebuilt over this process's tokenizer info (milliseconds for a schema's,
a tenth of a second for the largest regexes over gpt-oss's vocabulary).
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import re
import signal
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection

import xgrammar as xgr

from app.contract.failures import first_line

CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload([__name__])
WORKER_START_SECONDS = 120.0  # the first start also starts the forkserver (an xgrammar import)
# xgrammar prefixes its messages with a time and a C++ source location: the client gets the reason.
_ENGINE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


class CompileFailed(Exception):
    """The engine refused the grammar (its reason, in a sentence), or its worker died on it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WorkerUnavailable(Exception):
    """No worker could be started (the reason, in a sentence): nothing is known of the grammar."""


class CompileTimedOut(Exception):
    """The compile ran past the timeout; its worker was killed with it."""


def engine_reason(error: BaseException) -> str:
    return _ENGINE_PREFIX.sub("", first_line(error))[:300]


def compile_source(engine: xgr.GrammarCompiler, kind: str, source: str) -> xgr.CompiledGrammar:
    """One grammar of app.contract.grammar.GrammarSpec's kinds (a tool call's parts are schemas)."""
    match kind:
        case "json_object":
            return engine.compile_builtin_json_grammar()
        case "json_schema":
            # Compact JSON: a grammar that allows any whitespace lets a small model pad forever.
            return engine.compile_json_schema(source, any_whitespace=False, strict_mode=True)
        case "regex":
            return engine.compile_regex(source)
        case "choice":
            choices = json.loads(source)
            # JSON string literals are EBNF string literals (the same escapes).
            return engine.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in choices))
    raise CompileFailed(f"unknown grammar kind {kind!r}")


def serve(connection: Connection) -> None:
    """A worker: the tokenizer info first, then (kind, source) -> ("ok", JSON) | ("error", reason)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it kills us
    info = xgr.TokenizerInfo.deserialize_json(connection.recv())
    # Our cache (in the server) is the bounded one; xgrammar's would grow without limit.
    engine = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    connection.send("ready")
    while True:
        try:
            kind, source = connection.recv()
        except EOFError:  # the server is gone
            return
        try:
            reply = ("ok", compile_source(engine, kind, source).serialize_json())
        except CompileFailed as error:
            reply = ("error", error.reason)
        except Exception as error:  # xgrammar raises RuntimeError (and others) for bad input
            reply = ("error", engine_reason(error))
        connection.send(reply)


class _Worker:
    def __init__(self, tokenizer_info: str) -> None:
        self.connection, child = CONTEXT.Pipe()
        self.process = CONTEXT.Process(target=serve, args=(child,), name="gptoss-grammar", daemon=True)
        try:
            self.process.start()
        except Exception as error:  # fork or forkserver failure: out of memory, of processes...
            self.connection.close()
            raise WorkerUnavailable(f"the grammar engine could not start: {engine_reason(error)}") from error
        finally:
            child.close()
        try:
            self.connection.send(tokenizer_info)
            if not self.connection.poll(WORKER_START_SECONDS):
                raise WorkerUnavailable(f"the grammar engine did not start within {WORKER_START_SECONDS:g} s")
            self.connection.recv()
        except (EOFError, OSError):
            self.kill()
            raise WorkerUnavailable("the grammar engine exited as it started") from None
        except WorkerUnavailable:
            self.kill()
            raise

    def compile(self, kind: str, source: str, timeout: float) -> str:
        self.connection.send((kind, source))
        if not self.connection.poll(timeout):
            raise CompileTimedOut
        status, payload = self.connection.recv()
        if status != "ok":
            raise CompileFailed(str(payload))
        return str(payload)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.connection.close()


def _kill_all(workers: set[_Worker]) -> None:
    for worker in list(workers):
        worker.kill()


class CompileWorkers:
    """``processes`` workers, started on first use; ``compile`` blocks (call it off the event
    loop) until a worker is free, then for ``timeout`` seconds at most."""

    def __init__(self, tokenizer_info: Callable[[], str], processes: int, timeout: float) -> None:
        self.timeout = timeout
        self._tokenizer_info = tokenizer_info
        self._free: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()  # None: not started yet
        for _ in range(processes):
            self._free.put(None)
        self._started: set[_Worker] = set()
        weakref.finalize(self, _kill_all, self._started)  # a server that goes leaves no process behind

    @property
    def pids(self) -> list[int]:
        return [pid for worker in list(self._started) if (pid := worker.process.pid) is not None]

    def compile(self, kind: str, source: str) -> str:
        """The compiled grammar as xgrammar's JSON; CompileFailed, CompileTimedOut or WorkerUnavailable."""
        worker = self._free.get()
        try:
            if worker is None:
                worker = _Worker(self._tokenizer_info())
                self._started.add(worker)
            return worker.compile(kind, source, self.timeout)
        except (CompileTimedOut, EOFError, OSError) as error:
            self._retire(worker)
            worker = None
            if isinstance(error, CompileTimedOut):
                raise
            raise CompileFailed("the grammar engine's worker died compiling it") from None
        finally:
            self._free.put(worker)

    def _retire(self, worker: _Worker | None) -> None:
        if worker is not None:
            worker.kill()
            self._started.discard(worker)

"""Tensor parallel: one model sharded over the N ranks torchrun starts, driven by rank 0's scheduler.

transformers shards the weights with the model's own plan (``tp_plan="auto"``: gpt-oss's splits
the embedding by vocabulary rows and the LM head by columns, gathered), so every rank ends a
forward with the same full logits. Each rank keeps its own runner (KV cache, sequence table, each
request's generator). On rank 0 the scheduler drives a ``LeaderBackend``: each call is broadcast
to the other ranks, then run here; the other ranks (``follow``) receive each call and run it on
their own runner, in the same order, so every rank takes the same step and picks the same tokens.
A cancel is a ``release`` like any other call: it reaches every rank before the next step.

Every call carries a digest of what rank 0's previous call gave (each row's progress and tokens,
failures, rows in use): a follower whose own differs stops at once (``tensor_parallel_diverged``)
rather than go on from another state. A collective with a rank that is gone fails at once (gloo: "Connection closed by
peer"); the rank that sees it logs ``tensor_parallel_group_lost`` and exits 1, so no rank stays
half-alive, and torchrun stops the rest and exits non-zero.

The calls go over a gloo group of their own (on the CPU, whatever the model's backend), whose
timeout is long: an idle server's followers wait in a broadcast for the next call.

Expert parallel (``--expert-parallel``): on top of that plan, the model's own expert-parallel plan
(``base_model_ep_plan``, ``ep_size`` = the group's size) gives each rank whole experts, 1/N of them.
Every rank still holds the same batch, so transformers runs each rank's experts on all of it (the
routes to other ranks' experts masked) and sums the outputs with one all-reduce per MoE layer:
the same tokens as one rank, up to the order of that sum.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from types import FrameType
from typing import Any, NoReturn, Protocol

import structlog
import torch
import torch.distributed as dist

from app.config import ConfigError, launch_rank
from app.contract.failures import first_line
from app.contract.sampling import SamplingParams
from app.contract.step import PrefixCacheStats, StepPlan, StepResult
from app.engine.runner import BaseRunner
from app.engine.shards import TensorParallelError

log = structlog.get_logger("engine.tensor_parallel")

# Collectives inside a step: ranks that load a large checkpoint at different speeds meet in the
# first forward (transformers uses the same bound for its sharded loading).
MODEL_TIMEOUT = timedelta(hours=2)
# The calls: a follower of an idle server waits in a broadcast for the next one, for as long as
# the server runs. A rank that dies ends the wait at once (the connection closes), not this.
CONTROL_TIMEOUT = timedelta(days=365)
# The barrier every rank meets after "stop" before it exits: the followers are idle by then.
LEAVE_TIMEOUT = timedelta(seconds=60)
# The calls a follower runs on its runner; anything else in a Call is a bug on rank 0.
STEP_METHODS = frozenset({"add", "release", "step", "free_cached_memory"})


@dataclass(frozen=True, slots=True)
class Call:
    """One call rank 0 sends: a StepBackend method and its plain-data arguments, or "ping" (only
    the digest is checked) or "stop" (the server is done: followers exit 0)."""

    method: str
    args: tuple[Any, ...]
    expect: str  # the digest of what rank 0's previous call gave


class Channel(Protocol):
    """How calls travel from rank 0 to the others (a broadcast; an in-memory pair in tests)."""

    def send(self, call: Call) -> None: ...

    def receive(self) -> Call: ...


@dataclass(frozen=True, slots=True)
class Group:
    """This process's place in the tensor-parallel group."""

    rank: int
    size: int
    device: torch.device
    channel: Channel


class BroadcastChannel:
    """Calls as pickled objects broadcast from rank 0 over the control group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self._group = group

    def send(self, call: Call) -> None:
        dist.broadcast_object_list([call], src=0, group=self._group)

    def meet(self, timeout: timedelta) -> None:
        """Wait until every rank is here (rank 0 names the ones missing past the timeout)."""
        dist.monitored_barrier(group=self._group, timeout=timeout)

    def receive(self) -> Call:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        call = box[0]
        if not isinstance(call, Call):
            raise TensorParallelError(f"rank 0 sent {type(call).__name__}, not a call")
        return call


_joined: Group | None = None
_join_lock = threading.Lock()


def join(size: int) -> Group:
    """Join the group torchrun started (once per process; later calls return the same group): the
    default process group carries the model's collectives (NCCL on GPUs, gloo on the CPU) and a
    gloo group the calls. Each rank runs on its own GPU (LOCAL_RANK) or, with none, the CPU."""
    global _joined
    with _join_lock:
        if _joined is not None:
            return _joined
        try:
            launch_rank(size, os.environ)  # the same check as the command line's
        except ConfigError as error:
            raise TensorParallelError(str(error)) from error
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = torch.device("cpu")
        if accelerator is not None and accelerator.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=MODEL_TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=MODEL_TIMEOUT)
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        assert control is not None  # every rank is in it
        _joined = Group(dist.get_rank(), size, device, BroadcastChannel(control))
        log.info("tensor_parallel_joined", rank=_joined.rank, size=size, device=str(device), backend=dist.get_backend())
        return _joined


def joined() -> Group | None:
    return _joined


def check_expert_parallel(config: Any, size: int) -> None:
    """Refuse --expert-parallel on a model whose experts cannot be split over ``size`` ranks: one
    without an expert-parallel plan in transformers (a dense model has no experts), or whose
    expert count does not divide by it."""
    if size < 2:
        raise TensorParallelError("--expert-parallel needs --tensor-parallel-size N > 1: the ranks to shard over")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", "this model")
    if not getattr(text, "base_model_ep_plan", None):
        raise TensorParallelError(
            f"--expert-parallel: transformers has no expert-parallel plan for {model_type} "
            "(a dense model has no experts to shard); drop the flag to shard it by its tensor-parallel plan"
        )
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    if isinstance(experts, int) and experts % size:
        raise TensorParallelError(f"--expert-parallel: {experts} experts cannot be split evenly over {size} ranks")


@dataclass(frozen=True, slots=True)
class ShardBytes:
    """What this rank holds of the model's parameters, in bytes (its own shard of each)."""

    parameters: int
    experts: int  # of which the experts' (the modules the model's expert-parallel plan names)


def shard_bytes(model: torch.nn.Module) -> ShardBytes:
    """The bytes of the parameters this rank holds: a sharded one (a DTensor) counts its local
    part only, so under expert parallel each rank's expert bytes are 1/N of the whole."""
    plan = dict(getattr(model, "ep_plan", None) or {})
    # A plan key names a parameter or a module ("layers.*.mlp.experts"): all that lies under it.
    patterns = [re.compile(re.escape(key).replace(r"\*", r"\d+") + r"(\..+)?") for key in plan]
    parameters = experts = 0
    for name, parameter in model.named_parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        size = local.numel() * local.element_size()
        parameters += size
        if any(pattern.fullmatch(name) for pattern in patterns):
            experts += size
    return ShardBytes(parameters, experts)


def digest(method: str, outcome: object, rows_in_use: int) -> str:
    """What a call gave, in a form every rank computes alike: where a step left each row (its
    progress and tokens) and its failures (not its timings), add's start, an exception's type; and
    the rows in use after it."""
    shown: object = outcome
    if isinstance(outcome, StepResult):
        rows = sorted((seq_id, row.num_computed, row.tokens) for seq_id, row in outcome.rows.items())
        shown = (outcome.kind, rows, sorted(outcome.failed.items()))
    elif isinstance(outcome, BaseException):
        shown = ("raised", type(outcome).__name__)
    text = repr((method, shown, rows_in_use)).encode()
    return hashlib.blake2b(text, digest_size=8).hexdigest()


NOTHING_YET = digest("start", None, 0)


def _rows_in_use(runner: BaseRunner) -> int:
    return runner.max_batch_size - runner.free_rows


def exit_at_once(event: str, **fields: object) -> NoReturn:
    """Log why this rank stops, then exit 1 now: its peers are gone (or went elsewhere), and
    nothing it could still do (drain, answer) would be right."""
    log.critical(event, **fields)
    _exit_now(1)


def _exit_now(code: int) -> NoReturn:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class LeaderBackend:
    """Rank 0's StepBackend: each call goes to every follower, then runs on the local runner."""

    def __init__(
        self,
        runner: BaseRunner,
        channel: Channel,
        *,
        on_group_lost: Callable[..., NoReturn] = exit_at_once,
    ) -> None:
        self.runner = runner
        self._channel = channel
        self._lost = on_group_lost
        self._last = NOTHING_YET
        self._lock = threading.Lock()  # one call at a time, a late stop included
        self._stopped = False

    def __getattr__(self, name: str) -> Any:
        # What is only read (free_rows, kv_cache_bytes, vocab_size, grammars...): the local runner's.
        return getattr(self.runner, name)

    # -- StepBackend -------------------------------------------------------------------------------
    def add(
        self,
        seq_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Iterable[int] | None,
        fork_from: str | None = None,
    ) -> int:
        if params.seed is None and not params.greedy:
            # Every rank must draw the same random numbers: the seed is chosen here, once.
            params = replace(params, seed=secrets.randbits(63))
        stops = None if stop_token_ids is None else tuple(stop_token_ids)
        start: int = self._call("add", seq_id, tuple(prompt), params, stops, fork_from)
        return start

    def release(self, seq_id: str) -> None:
        self._call("release", seq_id)

    def step(self, plan: StepPlan, must_continue: Collection[str] = ()) -> StepResult:
        result: StepResult = self._call("step", plan, frozenset(must_continue))
        return result

    def free_cached_memory(self) -> None:
        self._call("free_cached_memory")

    def split(self, seq_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        return self.runner.split(seq_ids)  # reads the rows only: every rank would split alike

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return self.runner.prefix_cache_stats()

    # -- the group ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """The server is done: the followers leave their loop and exit 0 (idempotent)."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._send(Call("stop", (), self._last))

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self._stopped:
                raise RuntimeError("the tensor-parallel group is stopped")
            self._send(Call(method, args, self._last))
            try:
                outcome = getattr(self.runner, method)(*args)
            except Exception as error:
                self._last = digest(method, error, _rows_in_use(self.runner))
                # A rank lost in the middle of a forward shows here as the collective's error:
                # a ping tells that apart from a failure of this step alone.
                self._send(Call("ping", (), self._last))
                raise
            self._last = digest(method, outcome, _rows_in_use(self.runner))
            return outcome

    def _send(self, call: Call) -> None:
        try:
            self._channel.send(call)
        except Exception as error:
            self._lost("tensor_parallel_group_lost", rank=0, call=call.method, error=first_line(error))


def follow(runner: BaseRunner, channel: Channel, rank: int) -> int:
    """A follower's life: run each call rank 0 sends, until "stop" (0) or until the group is lost
    or this rank's results differ from rank 0's (1, logged)."""
    last = NOTHING_YET
    log.info("tensor_parallel_following", rank=rank)
    while True:
        try:
            call = channel.receive()
        except Exception as error:
            log.critical("tensor_parallel_group_lost", rank=rank, error=first_line(error))
            return 1
        if call.expect != last:
            log.critical(
                "tensor_parallel_diverged",
                rank=rank,
                detail="this rank's last call gave another result than rank 0's",
                next_call=call.method,
            )
            return 1
        if call.method == "stop":
            log.info("tensor_parallel_follower_stopped", rank=rank)
            return 0
        if call.method == "ping":
            continue
        if call.method not in STEP_METHODS:
            log.critical("tensor_parallel_unknown_call", rank=rank, call=call.method)
            return 1
        outcome: object
        try:
            outcome = getattr(runner, call.method)(*call.args)
        except Exception as error:  # rank 0 raised the same (its digest says), and reports it
            outcome = error
        last = digest(call.method, outcome, _rows_in_use(runner))
        if call.method in ("add", "release"):
            log.debug(f"tensor_parallel_{call.method}", rank=rank, request_id=call.args[0], rows=_rows_in_use(runner))


def serve_follower(runner: BaseRunner, group: Group) -> NoReturn:
    """Run a follower until rank 0 says stop, then exit (0; 1 once the group is lost). SIGTERM and
    SIGINT (torchrun passes them on) are logged and otherwise left to rank 0, which drains, then
    sends stop; a rank 0 that is gone ends the wait by itself."""

    def noted(signum: int, frame: FrameType | None) -> None:
        log.info("signal", signal=signal.Signals(signum).name, rank=group.rank, detail="waiting for rank 0's stop")

    signal.signal(signal.SIGTERM, noted)
    signal.signal(signal.SIGINT, noted)
    leave(follow(runner, group.channel, group.rank))


def leave(code: int) -> NoReturn:
    """The end of a rank (rank 0 after sending "stop", a follower after receiving it, or either
    once the group is lost): after a stop every rank meets at a barrier, then each exits at once.
    The process groups are never torn down, nor the interpreter finalized with them alive: gloo's
    teardown on one rank races its peers' (CI saw rank 0 die of SIGABRT after a stop, its follower
    still alive), and nothing after the last call needs them."""
    group = _joined
    if code == 0 and group is not None and isinstance(group.channel, BroadcastChannel):
        try:
            group.channel.meet(LEAVE_TIMEOUT)
        except Exception as error:
            log.critical("tensor_parallel_group_lost", rank=group.rank, call="leave", error=first_line(error))
            code = 1
    _exit_now(code)

"""Tensor parallel: the tiny gpt-oss sharded over 2 gloo ranks on this CPU (torchrun), against 1 rank.

transformers 5.24 shards gpt-oss by its own plan (``tp_plan="auto"``: the embedding by vocabulary
rows, the LM head by columns, gathered); attention and experts stay whole on every rank. Both
collectives are exact (a sum with zeros, a gather), so 2 ranks must give the very tokens of 1.

The fast tests drive the leader and a follower over an in-memory channel (no torch.distributed);
the slow ones start ``python -m torch.distributed.run --nproc-per-node 2 -m app`` and talk HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import httpx
import psutil
import pytest
import trio

from app.cli import main
from app.config import ConfigError, ServerConfig, launch_rank
from app.contract.sampling import SamplingParams
from app.contract.step import PrefillChunk, StepPlan
from app.engine.loader import ModelWeights, serve_weights
from app.engine.runner import BaseRunner
from app.engine.shards import TensorParallelError, local_kv_heads
from app.engine.tensor_parallel import Call, LeaderBackend, follow, shard_bytes
from tests.conftest import BARE, ROOT, running_server, wait_for_stats
from tools.server_process import free_port

# -- launching ------------------------------------------------------------------------------------


def test_launch_rank_checks_the_size_against_torchrun() -> None:
    assert launch_rank(1, {}) == 0
    assert launch_rank(2, {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == 1
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2 -m app"):
        launch_rank(2, {})
    with pytest.raises(ConfigError, match="torchrun started 4 ranks"):
        launch_rank(2, {"WORLD_SIZE": "4", "RANK": "0"})
    with pytest.raises(ConfigError, match="--tensor-parallel-size 2"):
        launch_rank(1, {"WORLD_SIZE": "2", "RANK": "0"})


def test_a_size_without_torchrun_is_refused_with_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--model", "tiny-gpt-oss", "--tensor-parallel-size", "2"]) == 2
    assert "torchrun --nproc-per-node 2 -m app --tensor-parallel-size 2" in capsys.readouterr().err


def test_the_size_must_be_positive_and_not_with_cuda_graphs() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        ServerConfig(tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="cuda-graphs"):
        ServerConfig(tensor_parallel_size=2, cuda_graphs=True)


# -- the leader and a follower, over an in-memory channel ------------------------------------------


class QueueChannel:
    """rank 0 -> rank 1 in one process: what a broadcast carries, in order."""

    def __init__(self) -> None:
        self.calls: queue.Queue[Call] = queue.Queue()

    def send(self, call: Call) -> None:
        self.calls.put(call)

    def receive(self) -> Call:
        return self.calls.get(timeout=60)


class GroupLost(Exception):
    pass


def lost(event: str, **fields: object) -> NoReturn:
    raise GroupLost(event, fields)


@dataclass
class Pair:
    """Rank 0's backend, and a follower's runner driven from a thread by ``follow``."""

    leader: LeaderBackend
    follower: BaseRunner
    exit_code: list[int] = field(default_factory=list)
    thread: threading.Thread | None = None

    def stop(self) -> int:
        self.leader.stop()
        return self.wait()

    def wait(self) -> int:
        assert self.thread is not None
        self.thread.join(60)
        return self.exit_code[0]


def leader_and_follower(weights: ModelWeights) -> Pair:
    channel = QueueChannel()
    leader_runner = serve_weights(weights, BARE, max_batch_size=4).runner
    follower_runner = serve_weights(weights, BARE, max_batch_size=4).runner
    assert isinstance(leader_runner, BaseRunner) and isinstance(follower_runner, BaseRunner)
    pair = Pair(LeaderBackend(leader_runner, channel, on_group_lost=lost), follower_runner)
    pair.thread = threading.Thread(target=lambda: pair.exit_code.append(follow(follower_runner, channel, rank=1)))
    pair.thread.start()
    return pair


def generate(backend: LeaderBackend, prompts: dict[str, tuple[list[int], SamplingParams]], steps: int) -> dict:
    tokens: dict[str, list[int]] = {seq_id: [] for seq_id in prompts}
    for seq_id, (prompt, params) in prompts.items():
        backend.add(seq_id, prompt, params, None)
    chunks = tuple(PrefillChunk(seq_id, len(prompt)) for seq_id, (prompt, _) in prompts.items())
    result = backend.step(StepPlan(chunks=chunks))
    for _ in range(steps):
        for seq_id, row in result.rows.items():
            tokens[seq_id].extend(row.tokens)
        result = backend.step(StepPlan(tuple(prompts)))
    return tokens


def test_a_follower_runs_every_call_and_picks_the_same_sampled_tokens(tiny_weights: ModelWeights) -> None:
    """Unseeded sampling draws its seed on rank 0: the follower's tokens match (the digest of
    every call is checked by the follower, which would exit 1 on a difference), and a release
    frees the row on both."""
    pair = leader_and_follower(tiny_weights)
    prompts = {
        "greedy": ([200006, 1000, 2000], SamplingParams(max_tokens=8, temperature=0.0)),
        "sampled": ([200006, 3000], SamplingParams(max_tokens=8, temperature=1.0)),
    }
    generate(pair.leader, prompts, steps=4)
    pair.leader.release("sampled")
    assert pair.stop() == 0
    assert pair.leader.runner.sequence_ids() == pair.follower.sequence_ids() == ["greedy"]


def test_a_follower_that_ends_up_elsewhere_stops_at_the_next_call(tiny_weights: ModelWeights) -> None:
    pair = leader_and_follower(tiny_weights)
    pair.leader.add("a", [200006, 1000], SamplingParams(max_tokens=4, temperature=0.0), None)
    pair.leader.runner.release("a")  # behind the follower's back: the ranks' rows differ from now on
    pair.leader.step(StepPlan())  # rank 0's digest of this call (no rows in use) is not the follower's
    assert pair.stop() == 1


def test_a_lost_rank_ends_rank_0_with_one_clear_event(tiny_weights: ModelWeights) -> None:
    class Broken:
        def send(self, call: Call) -> None:
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234\nmore")

        def receive(self) -> Call:
            raise AssertionError("rank 0 never receives")

    runner = serve_weights(tiny_weights, BARE, max_batch_size=2).runner
    assert isinstance(runner, BaseRunner)
    leader = LeaderBackend(runner, Broken(), on_group_lost=lost)
    with pytest.raises(GroupLost) as raised:
        leader.release("nobody")
    event, fields = raised.value.args
    assert event == "tensor_parallel_group_lost"
    assert fields["error"] == "Connection closed by peer [127.0.0.1]:1234"


# -- 2 ranks over gloo, end to end -----------------------------------------------------------------


@dataclass
class Torchrun:
    process: trio.Process
    url: str
    lines: list[str]

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            if line.startswith("{") and f'"{name}"' in line:
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def rank_pid(self, rank: int) -> int:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if child.environ().get("RANK") == str(rank):
                return int(child.pid)
        raise AssertionError(f"no process of rank {rank}")

    def tail(self) -> str:
        return "\n".join(self.lines[-30:])


def kill_all(process: trio.Process) -> None:
    """torchrun and the ranks it started (each in a session of its own: killpg would miss them)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    if process.returncode is None:
        process.kill()


@asynccontextmanager
async def torchrun_server(*args: str) -> AsyncIterator[Torchrun]:
    """The tiny gpt-oss on 2 ranks (gloo), rank 0 serving on a free port, until it is ready."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        *("--master-addr", "127.0.0.1", "--master-port", str(free_port())),
        *("-m", "app", "--model", "tiny-gpt-oss", "--tensor-parallel-size", "2", "--port", str(port)),
        *("--log-format", "json", "--log-level", "debug", "--responses-db", ":memory:", *args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = await trio.lowlevel.open_process(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    lines: list[str] = []

    async def read() -> None:
        assert process.stdout is not None
        buffer = b""
        while chunk := await process.stdout.receive_some():
            buffer += chunk
            *done, buffer = buffer.split(b"\n")
            lines.extend(line.decode(errors="replace") for line in done)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        running = Torchrun(process, f"http://127.0.0.1:{port}", lines)
        try:
            with trio.fail_after(180):
                async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
                    while True:
                        assert process.poll() is None, f"torchrun exited before serving:\n{running.tail()}"
                        try:
                            if (await client.get("/health")).json()["status"] == "ok":
                                break
                        except httpx.TransportError:
                            pass
                        await trio.sleep(0.2)
            yield running
        finally:
            kill_all(process)  # the reader then sees the output end
            with trio.CancelScope(shield=True):
                await process.wait()


async def stream(
    client: httpx.AsyncClient, body: dict[str, Any], stop_after: int | None = None
) -> tuple[str, list[int]]:
    """A /generate stream's request id and token ids; with ``stop_after`` the client leaves then."""
    request_id, tokens, name = "", [], ""
    async with client.stream("POST", "/generate", json={**body, "stream": True, "cache": False}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name in ("start", "token"):
                data = json.loads(line.removeprefix("data: "))
                if name == "start":
                    request_id = data["request_id"]
                else:
                    tokens.append(int(data["token_id"]))
                if stop_after is not None and len(tokens) >= stop_after:
                    break
    return request_id, tokens


PROMPTS = [
    {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
    {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0},
    {"prompt": "1 2 3 4", "max_tokens": 6, "temperature": 0},
    {"prompt": "Seeded", "max_tokens": 6, "temperature": 1.0, "seed": 7},
]


async def all_tokens(url: str, together: bool) -> list[list[int]]:
    results: list[list[int]] = [[] for _ in PROMPTS]
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(index: int) -> None:
            results[index] = (await stream(client, PROMPTS[index]))[1]

        if together:  # batched (and mixed) steps on the ranks
            async with trio.open_nursery() as nursery:
                for index in range(len(PROMPTS)):
                    nursery.start_soon(one, index)
        else:
            for index in range(len(PROMPTS)):
                await one(index)
    return results


@pytest.mark.slow
async def test_two_ranks_give_exactly_the_tokens_of_one(tiny_weights: ModelWeights) -> None:
    async with running_server(tiny_weights) as single:
        expected = await all_tokens(single.url, together=False)
    assert all(len(tokens) == body["max_tokens"] for tokens, body in zip(expected, PROMPTS, strict=True))
    async with torchrun_server() as group:
        assert await all_tokens(group.url, together=False) == expected
        assert await all_tokens(group.url, together=True) == expected
        assert not group.events("tensor_parallel_diverged"), group.tail()
        health = httpx.get(f"{group.url}/health").json()
        shards = group.events("tensor_parallel_shard")
    assert health["device"] == "cpu x2 (tensor parallel)"
    # gpt-oss's tensor-parallel plan leaves every rank all the experts (--expert-parallel shards them).
    experts = shard_bytes(tiny_weights.model).experts
    assert sorted((e["rank"], e["expert_bytes"]) for e in shards) == [(0, experts), (1, experts)], group.tail()


async def wait_for(condition: Callable[[], bool], what: Callable[[], str]) -> None:
    with trio.move_on_after(30):
        while not condition():
            await trio.sleep(0.05)
        return
    raise AssertionError(what())


@pytest.mark.slow
async def test_a_cancel_frees_the_row_on_both_ranks_and_a_stop_stops_both() -> None:
    async with torchrun_server() as group:
        async with httpx.AsyncClient(base_url=group.url, timeout=60) as client:
            body = {"prompt": "Tell me a long story", "max_tokens": 400, "temperature": 0}
            request_id, tokens = await stream(client, body, stop_after=3)
            assert len(tokens) == 3

            def released() -> list[dict[str, Any]]:
                return [e for e in group.events("tensor_parallel_release") if e["request_id"] == request_id]

            await wait_for(lambda: bool(released()), lambda: f"rank 1 never released {request_id}:\n{group.tail()}")
            assert released()[0]["rank"] == 1 and released()[0]["rows"] == 0
            stats = await wait_for_stats(client, lambda s: s["cancelled_requests"] == 1 and s["active_sequences"] == 0)
            # Rank 0 freed the row within one step of the abort; rank 1 got the release before that step.
            assert stats["model_metrics"]["tiny-gpt-oss"]["cancel_teardown_steps"]["max"] <= 1
        os.kill(group.rank_pid(0), signal.SIGTERM)
        with trio.fail_after(60):
            code = await group.process.wait()
        assert code == 0, group.tail()
        assert [e["rank"] for e in group.events("tensor_parallel_follower_stopped")] == [1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("killed", "flags"),
    [(1, ()), (0, ()), (1, ("--expert-parallel",))],
    ids=["a follower", "rank 0", "a follower, expert parallel"],
)
async def test_a_killed_rank_takes_the_whole_group_down(killed: int, flags: tuple[str, ...]) -> None:
    """With --expert-parallel each MoE layer adds an all-reduce: a lost rank ends the group alike."""
    async with torchrun_server(*flags) as group:
        async with httpx.AsyncClient(base_url=group.url, timeout=60) as client, trio.open_nursery() as nursery:

            async def read_on() -> None:
                body = {"prompt": "Go on and on", "max_tokens": 2000, "temperature": 0}
                # The server goes away mid-stream: what this test makes happen.
                with contextlib.suppress(httpx.HTTPError, AssertionError):
                    await stream(client, body)

            nursery.start_soon(read_on)
            await wait_for(
                lambda: bool(group.events("tensor_parallel_add")), lambda: f"no stream started:\n{group.tail()}"
            )
            os.kill(group.rank_pid(killed), signal.SIGKILL)
            with trio.fail_after(90):
                code = await group.process.wait()
            nursery.cancel_scope.cancel()
        assert code != 0
        survivor = 1 - killed
        lost_events = group.events("tensor_parallel_group_lost")
        assert [e["rank"] for e in lost_events] == [survivor], group.tail()
        assert lost_events[0]["level"] == "critical"


def test_a_rank_holds_the_key_heads_its_plan_leaves_it() -> None:
    """gpt-oss's plan keeps attention whole (every head on every rank); a plan that splits the key
    projections (Llama's) leaves each rank its share, and a count that does not split is refused."""

    class Sharded:
        def __init__(self, plan: dict[str, str], size: int) -> None:
            self.tp_plan, self.tp_size = plan, size

    gpt_oss = {"model.embed_tokens": "embedding_rowwise", "lm_head": "colwise_gather_output"}
    llama = {"model.layers.*.self_attn.k_proj": "colwise", "model.layers.*.self_attn.v_proj": "colwise"}
    assert local_kv_heads(Sharded(gpt_oss, 2), 2) == 2  # type: ignore[arg-type]
    assert local_kv_heads(Sharded(llama, 2), 8) == 4  # type: ignore[arg-type]
    assert local_kv_heads(Sharded({}, 1), 3) == 3  # type: ignore[arg-type]
    with pytest.raises(TensorParallelError, match="3 key/value heads cannot be split over 2 ranks"):
        local_kv_heads(Sharded(llama, 2), 3)  # type: ignore[arg-type]


def test_a_step_that_raises_on_rank_0_checks_the_group_at_once(tiny_weights: ModelWeights) -> None:
    """A rank lost in the middle of a forward shows on rank 0 as the step's own error: rank 0
    pings the group then, so it stops at once rather than wait for the next request."""

    class GoneAfterFirstCall:
        def __init__(self) -> None:
            self.sent: list[str] = []

        def send(self, call: Call) -> None:
            self.sent.append(call.method)
            if len(self.sent) > 1:
                raise RuntimeError("Connection closed by peer")

        def receive(self) -> Call:
            raise AssertionError("rank 0 never receives")

    runner = serve_weights(tiny_weights, BARE, max_batch_size=2).runner
    assert isinstance(runner, BaseRunner)
    channel = GoneAfterFirstCall()
    leader = LeaderBackend(runner, channel, on_group_lost=lost)
    with pytest.raises(GroupLost, match="tensor_parallel_group_lost"):
        leader.step(StepPlan(("nobody",)))  # raises KeyError here, as the collective's error would
    assert channel.sent == ["step", "ping"]


def test_a_step_that_raises_on_every_rank_keeps_the_group(tiny_weights: ModelWeights) -> None:
    pair = leader_and_follower(tiny_weights)
    with pytest.raises(KeyError):
        pair.leader.step(StepPlan(("nobody",)))  # the follower raises the same, and the digests agree
    pair.leader.add("a", [200006, 1000], SamplingParams(max_tokens=4, temperature=0.0), None)
    assert pair.stop() == 0
    assert pair.follower.sequence_ids() == ["a"]

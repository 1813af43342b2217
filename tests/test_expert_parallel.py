"""Expert parallel: the tiny gpt-oss's experts sharded over 2 gloo ranks on this CPU, against 1 rank.

With ``--expert-parallel`` transformers 5.24 applies gpt-oss's expert-parallel plan (ep_size = 2)
on top of its tensor-parallel one: each rank holds 2 of the 4 experts of every layer, runs them on
the whole batch (the routes to the other rank's experts masked) and an all-reduce sums the two
halves. A token's output is the sum of its top-2 experts' outputs, each from one rank and zeros
from the other, so 2 ranks must give the very tokens of 1.

The fast tests check the refusals and the byte count; the slow one starts
``python -m torch.distributed.run --nproc-per-node 2 -m app ... --expert-parallel`` and talks HTTP.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from app.cli import build_parser, main
from app.config import ConfigError, ServerConfig
from app.engine.loader import ModelLoadError, ModelWeights, load_weights
from app.engine.shards import TensorParallelError
from app.engine.tensor_parallel import check_expert_parallel, shard_bytes
from app.models.local_builds import tiny_gpt_oss_config
from app.models.registry import resolve
from tests.conftest import ROOT, running_server
from tests.test_tensor_parallel import PROMPTS, all_tokens, torchrun_server
from tools.server_process import free_port

# -- the flag and its refusals --------------------------------------------------------------------


def test_the_flag_has_vllms_spelling_too() -> None:
    parser = build_parser()
    assert parser.parse_args(["--expert-parallel"]).expert_parallel is True
    assert parser.parse_args(["--enable-expert-parallel"]).expert_parallel is True
    assert parser.parse_args([]).expert_parallel is False


def test_the_flag_needs_more_than_one_rank(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="--tensor-parallel-size N"):
        ServerConfig(expert_parallel=True)
    ServerConfig(expert_parallel=True, tensor_parallel_size=2)  # accepted
    assert main(["--model", "tiny-gpt-oss", "--expert-parallel"]) == 2
    assert "--expert-parallel shards the experts over the ranks of --tensor-parallel-size" in capsys.readouterr().err
    with pytest.raises(TensorParallelError, match="N > 1"):
        check_expert_parallel(tiny_gpt_oss_config(), 1)


def test_a_dense_model_is_refused_before_the_rank_joins_its_group() -> None:
    """smollm2-135m (Llama) has no experts and transformers no expert-parallel plan for it: the
    load fails with that, before torch.distributed is touched (no torchrun needed here)."""
    with pytest.raises(ModelLoadError, match="no expert-parallel plan for llama"):
        load_weights(resolve("smollm2-135m"), dtype="auto", device="auto", tensor_parallel_size=2, expert_parallel=True)


def test_experts_that_do_not_split_evenly_are_refused() -> None:
    check_expert_parallel(tiny_gpt_oss_config(), 2)
    check_expert_parallel(tiny_gpt_oss_config(), 4)
    with pytest.raises(TensorParallelError, match="4 experts cannot be split evenly over 3 ranks"):
        check_expert_parallel(tiny_gpt_oss_config(), 3)


@pytest.mark.slow
def test_a_dense_model_under_torchrun_stops_every_rank_with_the_reason() -> None:
    """Each rank refuses on its own (the check comes before the group forms), so torchrun exits
    non-zero at once instead of one rank waiting for a peer that is gone."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"),
        *("--master-addr", "127.0.0.1", "--master-port", str(free_port())),
        *("-m", "app", "--model", "smollm2-135m", "--tensor-parallel-size", "2", "--expert-parallel"),
        *("--port", str(free_port()), "--log-format", "json", "--responses-db", ":memory:"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "no expert-parallel plan for llama" in output, output[-3000:]
    assert '"model_load_failed"' in output  # rank 1's event (rank 0 fails its start-up with the same)


# -- what a rank holds ----------------------------------------------------------------------------


def test_the_expert_bytes_are_the_experts_parameters(tiny_weights: ModelWeights) -> None:
    held = shard_bytes(tiny_weights.model)
    named = dict(tiny_weights.model.named_parameters())
    experts = sum(p.numel() * p.element_size() for name, p in named.items() if ".mlp.experts." in name)
    assert held.experts == experts > 0
    assert held.parameters == sum(p.numel() * p.element_size() for p in named.values())


# -- two ranks over gloo --------------------------------------------------------------------------


@pytest.mark.slow
async def test_two_ranks_with_expert_parallel_give_the_tokens_of_one_and_half_the_experts_each(
    tiny_weights: ModelWeights,
) -> None:
    async with running_server(tiny_weights) as single:
        expected = await all_tokens(single.url, together=False)
    assert all(len(tokens) == body["max_tokens"] for tokens, body in zip(expected, PROMPTS, strict=True))
    whole = shard_bytes(tiny_weights.model)
    async with torchrun_server("--expert-parallel") as group:
        assert await all_tokens(group.url, together=False) == expected
        assert await all_tokens(group.url, together=True) == expected
        assert not group.events("tensor_parallel_diverged"), group.tail()
        health = httpx.get(f"{group.url}/health").json()
        shards = {event["rank"]: event for event in group.events("tensor_parallel_shard")}
    assert health["device"] == "cpu x2 (tensor parallel, expert parallel)"
    assert sorted(shards) == [0, 1], group.tail()
    for event in shards.values():
        assert event["expert_parallel"] is True
        assert event["expert_bytes"] * 2 == whole.experts  # 2 of the 4 experts of every layer
        # Less than the whole by at least those experts (the embedding's split comes on top).
        assert event["parameter_bytes"] <= whole.parameters - whole.experts // 2

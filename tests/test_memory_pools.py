"""Memory reserved at start-up: the row KV cache and the prefix cache's pool are taken whole when
the runner is made and kept, so traffic allocates none of it; /health and /stats show them; a pool
that does not fit fails the start-up with one line.

Breakage each test catches: a row cache that is dropped when the batch empties and grown again by
the next request (its memory follows the traffic), or that is not grown for a sequence longer than
its reservation; a prefix cache that allocates a block's tensors as it stores them; pools missing
from /health or /stats; a pool too big for the machine that is tried anyway (an OOM later) or
that fails with a traceback instead of a line that says what to lower.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import trio

from app.contract.sampling import SamplingParams
from app.contract.step import PrefillChunk
from app.engine.kv_cache import RowKVCache
from app.engine.loader import KV_RESERVED_POSITIONS, ModelLoadError, ModelWeights, serve_weights
from app.engine.runner import ModelRunner
from app.engine.slot_cache import SlotShape
from tests.conftest import BARE, running_server, server_config
from tests.test_disconnect import runner_of
from tools.server_process import ROOT

GREEDY = SamplingParams(max_tokens=3, temperature=0.0)
MiB = 1024 * 1024


def run_one(runner: ModelRunner, seq_id: str, prompt: list[int]) -> None:
    runner.add(seq_id, prompt, GREEDY)
    runner.prefill([PrefillChunk(seq_id, len(prompt))])
    runner.decode([seq_id])
    runner.release(seq_id)


def test_the_row_cache_is_reserved_at_start_and_kept_when_the_batch_empties(tiny_weights: ModelWeights) -> None:
    model = tiny_weights.model
    runner = ModelRunner(model, max_batch_size=3, max_context=512, stop_token_ids=[], reserve_positions=64)
    shape = SlotShape.for_model(model)
    reserved = RowKVCache.bytes_needed(shape.num_layers, 3, shape.kv_heads, 64, shape.head_dim, model.dtype)
    assert runner.kv_cache_bytes == reserved > 0
    storage = runner._rows.read_keys(0, 0, 0, 1)
    assert storage is not None
    first = storage[0].data_ptr()
    for i in range(3):
        run_one(runner, f"s{i}", list(range(10 + i, 50 + i)))
    after = runner._rows.read_keys(0, 0, 0, 1)
    assert runner.kv_cache_bytes == reserved and after is not None and after[0].data_ptr() == first
    # A sequence longer than the reservation grows it (doubling), and the growth stays too.
    run_one(runner, "long", list(range(1, 100)))
    assert runner.kv_cache_bytes == 2 * reserved
    (kv_cache,) = [pool for pool in runner.memory_pools() if pool.name == "kv_cache"]
    assert dict(kv_cache.figures) == {"rows": 3, "positions": 64, "max_positions": 512}


def test_a_prefix_cache_that_fills_and_evicts_allocates_nothing(tiny_weights: ModelWeights) -> None:
    runner = ModelRunner(
        tiny_weights.model, max_batch_size=2, max_context=512, stop_token_ids=[], prefix_cache_bytes=MiB
    )
    cache = runner.prefix_cache
    assert cache is not None
    pool = cache.pool
    storage = pool._storage.data_ptr()
    assert pool.reserved_bytes == pool.pages * pool.page_bytes > MiB - pool.page_bytes
    for i in range(40):  # 40 prompts of 3 blocks: more than the pool holds, so blocks are evicted
        run_one(runner, f"s{i}", [1000 + i, *range(2000, 2100)])
    stats = cache.stats()
    assert stats.evictions > 0 and stats.bytes <= pool.reserved_bytes
    assert pool._storage.data_ptr() == storage and pool.used_pages + pool.free_pages == pool.pages
    assert all(isinstance(page, int) for block in cache._blocks.values() for page in block.pages)


@pytest.mark.parametrize(
    ("prefix_cache_bytes", "max_batch_size", "lower"),
    [(2**50, 2, "--prefix-cache-mb"), (0, 2**30, "--max-batch-size")],
)
def test_a_pool_that_cannot_be_reserved_is_a_load_error(
    tiny_weights: ModelWeights, prefix_cache_bytes: int, max_batch_size: int, lower: str
) -> None:
    with pytest.raises(ModelLoadError) as raised:
        serve_weights(tiny_weights, replace(BARE, prefix_cache_bytes=prefix_cache_bytes), max_batch_size=max_batch_size)
    message = str(raised.value)
    assert "\n" not in message and "MiB" in message and "free" in message and message.endswith(f"lower {lower}")


def test_the_server_refuses_to_start_with_a_pool_the_machine_cannot_hold() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "--model", "tiny-gpt-oss", "--port", "0", "--prefix-cache-mb", "1000000000"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "the prefix KV cache's pool needs" in errors[0] and "lower --prefix-cache-mb" in errors[0]
    assert "Traceback" not in result.stderr


async def test_health_and_stats_show_what_was_reserved(tiny_weights: ModelWeights) -> None:
    config = server_config(prefix_cache_bytes=4 * MiB)
    async with running_server(tiny_weights, config) as server, server.client() as client:
        with trio.fail_after(30):
            health = (await client.get("/health")).json()
            stats = (await client.get("/stats")).json()
    runner = runner_of(server)
    pools = health["memory_pools"]
    assert set(pools) == {"kv_cache", "prefix_cache", "grammar_masks"}
    assert pools["kv_cache"] == {
        "bytes": runner.kv_cache_bytes,
        "rows": 8,
        "positions": KV_RESERVED_POSITIONS,
        "max_positions": health["max_context"],
    }
    prefix = pools["prefix_cache"]
    assert prefix["bytes"] == prefix["pages"] * prefix["page_bytes"] <= 4 * MiB and prefix["block_tokens"] == 32
    (figures,) = stats["model_metrics"].values()
    assert figures["memory_pools"] == pools
    assert figures["prefix_cache"]["reserved_bytes"] == prefix["bytes"]

"""The prefix KV cache: what it keeps and evicts, and that reusing it changes no token.

Breakage each test catches: blocks kept past the byte bound, or evicted in the wrong order, or a
block a running sequence holds evicted; a cancelled request that leaves its blocks pinned; a match
whose sliding-window layers lack keys in the window before it (the tiny gpt-oss slides 32
positions: its prompts here are longer), or a copy that misses a layer or a position (greedy tokens
then differ from a run without the cache); a scheduler that prefills a prompt the runner already
had the start of (the fake runner asserts it); usage that does not say how many tokens were reused;
a prompt kept only when its sequence ends (requests running meanwhile would not share it).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
import trio

from actors.messages import Admitted, PromptReused, SchedulerEvent, Submit, TokenOut
from actors.metrics_events import MetricsEvent
from actors.scheduler import GpuScheduler
from app.config import Profile
from app.contract.sampling import SamplingParams
from app.contract.step import PrefillChunk
from app.engine.cuda_graphs import StepGraphs
from app.engine.loader import ModelWeights
from app.engine.memory_pools import PagePool, PageShape
from app.engine.prefix_cache import LayerLayout, PrefixKVCache
from app.engine.runner import BaseRunner, ModelRunner
from app.engine.static_runner import StaticModelRunner
from tests.conftest import running_server, server_config, wait_for_stats
from tests.fakes import FakeBackend, chosen, inline_steps
from tools.gpu_check.frozen_capture import FrozenCapture

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
MiB = 1024 * 1024


# -- block accounting, on rows of plain tensors ---------------------------------------------------
class Rows:
    """Rows of keys like a runner's cache: [rows, heads, positions, head_dim] per layer."""

    def __init__(self, layers: int = 2, rows: int = 2, positions: int = 256) -> None:
        self.keys = [torch.randn(rows, 2, positions, 4) for _ in range(layers)]
        self.values = [torch.randn(rows, 2, positions, 4) for _ in range(layers)]

    def read_keys(self, row: int, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][row, :, start:end], self.values[layer][row, :, start:end]

    def write_keys(self, row: int, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[layer][row, :, start : start + keys.shape[1]] = keys
        self.values[layer][row, :, start : start + keys.shape[1]] = values


BLOCK = 8
FULL_ONLY = LayerLayout(full=(0, 1), sliding=(), window=None)
BLOCK_BYTES = 2 * 2 * 2 * BLOCK * 4 * 4  # layers x (keys, values) x heads x positions x head_dim x fp32


def cache_of(layout: LayerLayout, max_bytes: int) -> PrefixKVCache:
    """A prefix cache over a pool of ``max_bytes`` for Rows' shape (2 heads of 4, fp32, CPU)."""
    return PrefixKVCache(layout, PagePool(PageShape(2, BLOCK, 4), max_bytes, torch.float32, torch.device("cpu")))


def tokens(seed: int, n: int = 4 * BLOCK) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(n)]


def test_blocks_stay_within_bytes_and_the_least_recently_used_leave_first() -> None:
    cache = cache_of(FULL_ONLY, 8 * BLOCK_BYTES)
    rows = Rows()
    a, b, c = tokens(1), tokens(2), tokens(3)
    assert cache.store(a, len(a), rows, 0) == 4 and cache.store(b, len(b), rows, 1) == 4
    assert cache.size_bytes == 8 * BLOCK_BYTES
    assert cache.lookup([*a, 7]).length == 4 * BLOCK  # a is used again: b is now the oldest
    cache.store(c, len(c), rows, 0)
    assert cache.size_bytes <= cache.max_bytes
    assert cache.lookup([*b, 7]).length == 0
    assert cache.lookup([*a, 7]).length == 4 * BLOCK
    assert cache.lookup([*c, 7]).length == 4 * BLOCK
    stats = cache.stats()
    assert (stats.evictions, stats.blocks, stats.bytes) == (4, 8, 8 * BLOCK_BYTES)
    assert (stats.lookups, stats.hits, stats.hit_tokens) == (4, 3, 3 * 4 * BLOCK)


def test_a_chain_is_evicted_from_its_end() -> None:
    cache = cache_of(FULL_ONLY, 6 * BLOCK_BYTES)
    rows = Rows()
    a, b = tokens(1), tokens(2, 2 * BLOCK)
    cache.store(a, len(a), rows, 0)
    cache.store(b, len(b), rows, 1)
    cache.store(tokens(3, 2 * BLOCK), 2 * BLOCK, rows, 0)  # two of a's blocks must go: its last two
    assert cache.lookup([*a, 7]).length == 2 * BLOCK


def test_pinned_blocks_are_never_evicted_and_unpinned_ones_are() -> None:
    cache = cache_of(FULL_ONLY, 4 * BLOCK_BYTES)
    rows = Rows()
    a = tokens(1)
    cache.store(a, len(a), rows, 0)
    match = cache.lookup([*a, 7])
    cache.pin(match.blocks)
    assert cache.pinned_blocks == 4
    assert cache.store(tokens(2), 4 * BLOCK, rows, 1) == 0  # no room: nothing of a may go
    assert cache.lookup([*a, 7]).length == 4 * BLOCK
    cache.unpin(match.blocks)
    assert cache.pinned_blocks == 0
    assert cache.store(tokens(2), 4 * BLOCK, rows, 1) == 4
    assert cache.lookup([*a, 7]).length == 0 and cache.size_bytes <= cache.max_bytes


def test_a_match_copies_the_keys_and_leaves_the_last_prompt_token() -> None:
    cache = cache_of(FULL_ONLY, MiB)
    rows = Rows()
    a = tokens(1)
    cache.store(a, len(a), rows, 0)
    assert cache.lookup(a).length == 3 * BLOCK  # the whole prompt cached: its last token is prefilled
    match = cache.lookup([*a, 7])
    cache.load(match, rows, 1)
    for layer in range(2):
        assert torch.equal(rows.keys[layer][1, :, : 4 * BLOCK], rows.keys[layer][0, :, : 4 * BLOCK])
        assert torch.equal(rows.values[layer][1, :, : 4 * BLOCK], rows.values[layer][0, :, : 4 * BLOCK])


def test_sliding_layers_keep_only_the_window_before_each_end() -> None:
    layout = LayerLayout(full=(0,), sliding=(1,), window=2 * BLOCK)
    cache = cache_of(layout, MiB)
    rows = Rows()
    a = tokens(1, 6 * BLOCK)
    cache.store(a, len(a), rows, 0)
    full_block, sliding_part = BLOCK_BYTES // 2, BLOCK_BYTES // 2
    assert cache.size_bytes == 6 * full_block + 2 * sliding_part  # the sliding part of the last 2 only
    assert cache.lookup([*a, 7]).length == 6 * BLOCK
    # Another prompt that leaves a at block 3: no sliding keys before there, so no match at all.
    assert cache.lookup(a[: 3 * BLOCK + 2] + [7] * 20).length == 0
    # A second end point at block 3 (a prompt's end) keeps the window before it too.
    cache.store(a, 3 * BLOCK + 2, rows, 0)
    assert cache.lookup(a[: 3 * BLOCK + 2] + [7] * 20).length == 3 * BLOCK
    match = cache.lookup(a[: 3 * BLOCK + 2] + [7] * 20)
    assert cache.load(match, rows, 1) == BLOCK  # the sliding layer's real keys start at block 1
    assert torch.equal(rows.keys[1][1, :, BLOCK : 3 * BLOCK], rows.keys[1][0, :, BLOCK : 3 * BLOCK])


def test_a_branch_keeps_the_window_before_it_for_the_next_prompt_that_shares_it() -> None:
    layout = LayerLayout(full=(0,), sliding=(1,), window=2 * BLOCK)
    cache = cache_of(layout, MiB)
    rows = Rows()
    system = tokens(1, 3 * BLOCK)
    first, second, third = (system + tokens(seed, 2 * BLOCK) for seed in (2, 3, 4))
    cache.store(first, len(first), rows, 0)
    assert cache.lookup(second).length == 0  # the window before the shared start was not kept
    cache.store(second, len(second), rows, 1)  # it leaves first's chain after the system prompt
    assert cache.lookup(third).length == 3 * BLOCK


def test_a_prefix_the_row_does_not_really_hold_is_not_kept() -> None:
    layout = LayerLayout(full=(0,), sliding=(1,), window=2 * BLOCK)
    cache = cache_of(layout, MiB)
    a = tokens(1, 6 * BLOCK)
    # The row's sliding keys are real only from block 5 on: the window before 6 needs block 4 too.
    cache.store(a, len(a), Rows(), 0, sliding_from=5 * BLOCK)
    assert cache.lookup([*a, 7]).length == 0


# -- the runners: the same greedy tokens with and without it ---------------------------------------
def generate(runner: BaseRunner, seq_id: str, prompt: list[int], chunk: int = 48) -> tuple[int, list[int]]:
    """(prompt tokens it started with, its greedy tokens); released at the end."""
    cached = runner.add(seq_id, prompt, GREEDY)
    out: list[int] = []
    while not out:
        result = runner.prefill([PrefillChunk(seq_id, chunk)])
        out += [chosen(result)[seq_id]] if seq_id in chosen(result) else []
    while len(out) < GREEDY.max_tokens:
        out.append(chosen(runner.decode([seq_id]))[seq_id])
    runner.release(seq_id)
    return cached, out


def row_runner(weights: ModelWeights, prefix_bytes: int) -> BaseRunner:
    return ModelRunner(
        weights.model, max_batch_size=2, max_context=1024, stop_token_ids=[], prefix_cache_bytes=prefix_bytes
    )


def slot_runner(weights: ModelWeights, prefix_bytes: int) -> BaseRunner:
    return StaticModelRunner(
        weights.model,
        max_batch_size=2,
        max_context=512,
        stop_token_ids=[],
        graphs=StepGraphs(FrozenCapture()),
        smallest_kv_bucket=16,
        prefix_cache_bytes=prefix_bytes,
    )


def conversation_checks(weights: ModelWeights, make: Callable[[ModelWeights, int], BaseRunner]) -> None:
    rng = random.Random(5)
    vocab = min(int(weights.model.config.get_text_config().vocab_size), 30_000)

    def words(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    system = words(110)
    plain, cached = make(weights, 0), make(weights, 64 * MiB)
    # A first request, then one that shares its first 110 tokens, then a chat's second turn.
    first = system + words(20)
    assert generate(plain, "a", first) == generate(cached, "a", first)
    second = first[:110] + words(15)
    turn_two = first + generate(plain, "x", first)[1][:-1] + words(12)
    for seq_id, prompt in (("b", second), ("c", turn_two)):
        start, tokens = generate(cached, seq_id, prompt)
        assert (0, tokens) == generate(plain, seq_id, prompt)
        if seq_id == "c":
            assert start >= len(first) - 32  # it resumed where the first turn's prompt ended
    assert cached.prefix_cache is not None and cached.prefix_cache.pinned_blocks == 0


@pytest.mark.parametrize("make", [row_runner, slot_runner], ids=["row_cache", "slot_cache"])
def test_tiny_gpt_oss_gives_the_same_tokens_with_the_prefix_cache(
    tiny_weights: ModelWeights, make: Callable[[ModelWeights, int], BaseRunner]
) -> None:
    assert tiny_weights.model.config.sliding_window == 32  # the prompts are longer than the window
    conversation_checks(tiny_weights, make)


def test_smollm2_gives_the_same_tokens_with_the_prefix_cache(smollm2_weights: ModelWeights) -> None:
    conversation_checks(smollm2_weights, row_runner)


def test_a_sequence_holds_its_blocks_until_it_is_released(tiny_weights: ModelWeights) -> None:
    runner = row_runner(tiny_weights, 64 * MiB)
    prompt = list(range(1000, 1100))
    generate(runner, "a", prompt)
    assert runner.add("b", [*prompt, 5], GREEDY) == 96
    assert runner.prefix_cache is not None and runner.prefix_cache.pinned_blocks == 3
    runner.release("b")  # cancelled before its prefill: nothing pinned is left behind
    assert runner.prefix_cache.pinned_blocks == 0


def test_a_prompt_is_shared_as_soon_as_it_is_prefilled(tiny_weights: ModelWeights) -> None:
    runner, plain = row_runner(tiny_weights, 64 * MiB), row_runner(tiny_weights, 0)
    prompt = list(range(3000, 3100))
    runner.add("a", prompt, GREEDY)
    runner.prefill([PrefillChunk("a", len(prompt))])  # a still runs: its prompt is in the cache already
    start, tokens = generate(runner, "b", [*prompt, 11, 12])
    assert start == 96 and tokens == generate(plain, "b", [*prompt, 11, 12])[1]


# -- the scheduler ----------------------------------------------------------------------------------
async def test_the_scheduler_prefills_only_what_the_runner_did_not_have() -> None:
    backend = FakeBackend(cached_prefix=lambda prompt: len(prompt) - 3)
    metrics_send, _ = trio.open_memory_channel[MetricsEvent](math.inf)
    profile = Profile("test", 4, 8, 16, 2, arrival_window_ms=0)
    scheduler = GpuScheduler(backend, profile, 4096, metrics_send, step_caller=inline_steps(0.01))
    prompt = tuple(range(1, 41))
    send, receive = trio.open_memory_channel[SchedulerEvent](16)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        scheduler.submit(Submit("a", prompt, SamplingParams(max_tokens=4, temperature=0.0), frozenset(), 0.0, send))
        events = [event async for event in receive]
        scheduler.close()
    kinds = [type(e) for e in events]
    assert kinds.index(Admitted) < kinds.index(PromptReused) < kinds.index(TokenOut)
    reused = next(e for e in events if isinstance(e, PromptReused))
    assert reused.tokens == 37
    assert [e.token_id for e in events if isinstance(e, TokenOut)] == [1, 2, 3, 4]
    assert [kind for kind, _ in backend.log] == ["prefill", "decode", "decode", "decode"]


# -- the server: usage, /stats, /metrics, a cancel ---------------------------------------------------
async def test_usage_stats_and_metrics_report_reused_tokens(tiny_weights: ModelWeights) -> None:
    prompt = list(range(2000, 2100))
    async with running_server(tiny_weights, server_config()) as server, server.client() as client:
        body = {"model": "tiny-gpt-oss", "max_tokens": 3, "temperature": 0}
        first = (await client.post("/v1/completions", json={**body, "prompt": prompt})).json()
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        second = (await client.post("/v1/completions", json={**body, "prompt": [*prompt, 7, 8]})).json()
        assert second["usage"]["prompt_tokens"] == 102
        assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 96}
        # A prompt-cache replay prefilled nothing: all of its prompt tokens are cached.
        replay = await client.post("/v1/completions", json={**body, "prompt": prompt})
        assert replay.headers["X-Cache"] == "HIT"
        assert replay.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 100}
        # A streamed request that is cancelled after its first chunk unpins what it matched.
        stream_body = {**body, "prompt": [*prompt, 9], "max_tokens": 200, "stream": True}
        async with client.stream("POST", "/v1/completions", json=stream_body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    break
        model = server.server.pipeline.model
        runner = model.runner if model else None
        assert isinstance(runner, BaseRunner) and runner.prefix_cache is not None

        def settled(stats: dict[str, Any]) -> bool:
            figures = stats["model_metrics"]["tiny-gpt-oss"]
            return bool(figures["active_sequences"] == 0 and figures["prefix_cache"]["lookups"] == 3)

        stats = await wait_for_stats(client, settled, server=server)
        assert runner.prefix_cache.pinned_blocks == 0
        prefix = stats["model_metrics"]["tiny-gpt-oss"]["prefix_cache"]
        assert prefix["enabled"] and prefix["hits"] == 2 and prefix["hit_tokens"] == 96 + 96
        assert 0 < prefix["bytes"] <= prefix["max_bytes"]
        metrics = (await client.get("/metrics")).text
    assert 'gptoss_prefix_cache_hit_tokens_total{model="tiny-gpt-oss"' in metrics
    assert "gptoss_prefix_cache_bytes{" in metrics and "gptoss_prefix_cache_lookups_total{" in metrics


async def test_running_usage_reports_reused_tokens_from_the_first_chunk(tiny_weights: ModelWeights) -> None:
    """continuous_usage_stats: the reused prompt tokens are known once the prompt is in, so every
    chunk's usage carries them, not only the last one's; /generate's replay says all were cached."""
    prompt = list(range(3000, 3100))
    async with running_server(tiny_weights, server_config()) as server, server.client() as client:
        body = {"model": "tiny-gpt-oss", "max_tokens": 4, "temperature": 0}
        await client.post("/v1/completions", json={**body, "prompt": prompt})
        streamed = {
            **body,
            "prompt": [*prompt, 5],
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        usages = []
        async with client.stream("POST", "/v1/completions", json=streamed) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    usages.append(json.loads(line[len("data: ") :])["usage"])
        assert len(usages) >= 5 and all(u["prompt_tokens_details"] == {"cached_tokens": 96} for u in usages), usages
        native = {"prompt": "the same words twice", "max_tokens": 3, "temperature": 0, "stream": False}
        first = (await client.post("/generate", json=native)).json()
        again = (await client.post("/generate", json=native)).json()
        assert again["cached"] and again["usage"]["cached_tokens"] == again["usage"]["prompt_tokens"] > 0
        assert first["usage"]["cached_tokens"] < first["usage"]["prompt_tokens"]

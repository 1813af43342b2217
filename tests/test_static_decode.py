"""The static decode path (``--cuda-graphs``) on the CPU: slot cache, buckets, capture and replay.

CUDA graphs cannot be captured here, so the graph path runs on ``FrozenCapture`` (see
tools/gpu_check/frozen_capture.py): each (batch, kv_length) bucket is recorded once at the aten level and
replayed without running Python again, and a step that would not capture on a GPU (a host
synchronisation, a tensor made from Python data) fails its capture. Greedy tokens must still be
generate()'s, with sequences joining and leaving mid-flight and prompts longer than the window.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import trio

from app.contract.step import PrefillChunk
from app.engine.cuda_graphs import StepGraphs
from app.engine.kv_cache import Segment
from app.engine.loader import ModelWeights, serve_weights
from app.engine.runner import ModelRunner
from app.engine.slot_cache import SlotKVCache, SlotShape
from app.engine.static_decode import batch_buckets, bucket_for, kv_buckets
from app.engine.static_runner import StaticModelRunner
from app.prompts.harmony_encoding import harmony_encoding
from tests.conftest import BARE, running_server, server_config
from tests.test_engine import GREEDY, drive, random_prompts, reference_greedy
from tests.test_http_generate import stream_events
from tools.gpu_check.frozen_capture import CaptureError, FrozenCapture


def static_runner(
    weights: ModelWeights, capture: FrozenCapture | None, max_batch_size: int = 4, max_context: int = 4096
) -> StaticModelRunner:
    return StaticModelRunner(
        weights.model,
        max_batch_size=max_batch_size,
        max_context=max_context,
        stop_token_ids=[],
        graphs=StepGraphs(capture),
        smallest_kv_bucket=16,  # small buckets, so these short sequences cross several
    )


def test_replayed_static_steps_match_generate_and_the_dynamic_path(tiny_weights: ModelWeights) -> None:
    n = 24
    prompts = random_prompts(6, 199_000)
    expected = {name: reference_greedy(tiny_weights, prompt, n) for name, prompt in prompts.items()}
    joins = {name: 3 * i for i, name in enumerate(prompts)}
    greedy = {name: GREEDY for name in prompts}
    capture = FrozenCapture()
    runner = static_runner(tiny_weights, capture)
    cache_bytes = runner.kv_cache_bytes
    # Six sequences through four slots: the later ones take the slots of those that left.
    static = drive(runner, prompts, n, joins, greedy, chunk=7)
    dynamic = drive(
        ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[]),
        prompts,
        n,
        joins,
        greedy,
        chunk=7,
    )
    assert static == expected
    assert static == dynamic
    assert runner.graphs.failure is None
    assert capture.captures == runner.graphs.captured >= 2, "several buckets were used"
    assert capture.replays > capture.captures, "later steps replayed the captured ones"
    assert runner.kv_cache_bytes == cache_bytes, "allocated once: nothing grew, nothing was dropped"


def test_llama_architecture_on_the_static_path(smollm2_weights: ModelWeights) -> None:
    n = 12
    tokenizer = smollm2_weights.tokenizer
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived", "1, 2, 3,"]
    prompts = {f"s{i}": tokenizer.encode(t) for i, t in enumerate(texts)}
    expected = {name: reference_greedy(smollm2_weights, prompt, n) for name, prompt in prompts.items()}
    runner = static_runner(smollm2_weights, FrozenCapture(), max_context=64)
    out = drive(runner, prompts, n, {"s0": 0, "s1": 2, "s2": 5}, {name: GREEDY for name in prompts}, chunk=5)
    assert out == expected


def test_a_failed_capture_falls_back_to_eager_steps(tiny_weights: ModelWeights) -> None:
    def refuse(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        raise RuntimeError("operation not permitted when stream is capturing")

    n = 10
    prompts = random_prompts(3, 199_000, seed=3)
    expected = {name: reference_greedy(tiny_weights, prompt, n) for name, prompt in prompts.items()}
    runner = StaticModelRunner(
        tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[], graphs=StepGraphs(refuse)
    )
    out = drive(runner, prompts, n, {name: i for i, name in enumerate(prompts)}, dict.fromkeys(prompts, GREEDY), 64)
    assert out == expected
    assert not runner.graphs.enabled and "stream is capturing" in (runner.graphs.failure or "")


def test_graphs_for_every_batch_bucket_can_be_captured_ahead(tiny_weights: ModelWeights) -> None:
    capture = FrozenCapture()
    runner = static_runner(tiny_weights, capture, max_batch_size=6)
    assert runner.batch_buckets == (1, 2, 4, 6)
    assert runner.capture_graphs(up_to_positions=32) == 4 * 2  # kv buckets 16 and 32
    prompt = random_prompts(1, 199_000)["s0"][:10]
    runner.add("a", prompt, GREEDY)
    runner.prefill([PrefillChunk("a", len(prompt))])
    runner.decode(["a"])
    # Each capture is replayed once at once (a captured graph has not run yet); the step added one.
    assert capture.captures == 8 and capture.replays == 8 + 1, "the step replayed a graph captured ahead"


def test_the_dynamic_decode_step_would_not_capture(tiny_weights: ModelWeights) -> None:
    """Why the static path exists: the row cache's step builds its inputs from Python lists."""
    runner = ModelRunner(tiny_weights.model, max_batch_size=2, max_context=4096, stop_token_ids=[])
    runner.add("a", [1000, 1001, 1002], GREEDY)
    runner.prefill([PrefillChunk("a", 3)])

    def step() -> torch.Tensor:
        runner.decode(["a"])
        return torch.zeros(1)

    with pytest.raises(CaptureError, match="lift_fresh"):
        FrozenCapture()(step)


def test_frozen_capture_replays_without_running_python() -> None:
    buffer = torch.zeros(2)
    scalar = [1.0]
    capture = FrozenCapture()
    replay = capture(lambda: (buffer + scalar[0]) * 2)
    scalar[0] = 100.0  # Python state after capture is not seen, as on a GPU
    buffer.fill_(1.0)  # device buffers are
    assert replay().tolist() == [4.0, 4.0]
    with pytest.raises(CaptureError, match="_local_scalar_dense"):
        capture(lambda: torch.full((1,), buffer.sum().item()))


def test_slot_cache_frees_a_slot_without_moving_the_others() -> None:
    shape = SlotShape(num_layers=1, kv_heads=1, head_dim=2)
    cache = SlotKVCache(shape, slots=3, positions=8, dtype=torch.float32, device=torch.device("cpu"))
    assert [cache.take_slot() for _ in range(3)] == [0, 1, 2]
    keys = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 1, 4, 2)
    packed = keys.permute(1, 0, 2, 3).reshape(1, 1, 12, 2)
    cache.plan_prefill((Segment(0, 0, 4), Segment(1, 0, 4), Segment(2, 0, 4)))
    cache.update(packed, packed, 0)
    cache.clear_plan()
    storage = cache._keys[0].data_ptr()
    cache.free_slot(1)
    assert cache.take_slot() == 1, "the lowest free slot is taken first"
    cache.free_slot(0)
    # A padded decode over slots 0-2: slot 2 decodes at position 4, the others write to scratch.
    writes = torch.tensor([cache.scratch_position, cache.scratch_position, 4])
    cache.plan_decode(writes, batch=3, kv_length=5)
    new = torch.full((3, 1, 1, 2), -1.0)
    k, _ = cache.update(new, new, 0)
    assert cache._keys[0].data_ptr() == storage
    assert torch.equal(k[2, :, :4], keys[2]) and torch.equal(k[2, :, 4], torch.full((1, 2), -1.0))
    assert torch.equal(k[1, :, :4], keys[1]), "slot 1 was never copied or overwritten"
    assert torch.equal(k[0, :, :4], keys[0]), "a freed slot keeps its (stale) keys until reused"
    with pytest.raises(ValueError):
        cache.free_slot(0)
    with pytest.raises(ValueError):
        cache.reserve(1, 9)


def test_buckets() -> None:
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert kv_buckets(4096) == (256, 512, 1024, 2048, 4096)
    assert kv_buckets(3000) == (256, 512, 1024, 2048, 3000)
    assert kv_buckets(100) == (100,)
    assert bucket_for(5, (1, 2, 4, 8)) == 8 and bucket_for(1, (1, 2)) == 1
    with pytest.raises(ValueError):
        bucket_for(9, (1, 2, 4, 8))


def test_serve_weights_picks_the_runner(tiny_weights: ModelWeights) -> None:
    static = serve_weights(tiny_weights, replace(BARE, cuda_graphs=True, max_seq_len=512), max_batch_size=2)
    assert isinstance(static.runner, StaticModelRunner)
    assert static.decode_path == "static" and static.max_context == 512  # no CUDA here: eager
    default = serve_weights(tiny_weights, replace(BARE, cuda_graphs=True), max_batch_size=2)
    assert default.max_context == 4096, "the static path's default: every slot is allocated at start-up"
    dynamic = serve_weights(tiny_weights, BARE, max_batch_size=2)
    assert isinstance(dynamic.runner, ModelRunner) and dynamic.decode_path == "dynamic"
    assert dynamic.max_context == 8192


async def test_the_server_on_the_static_path(tiny_weights: ModelWeights) -> None:
    prompts = ["first prompt", "a second and somewhat longer prompt " * 8, "third"]
    config = server_config(cuda_graphs=True, max_seq_len=1024)
    with trio.fail_after(60):
        async with running_server(tiny_weights, config) as server, server.client() as client:
            health = (await client.get("/health")).json()
            together: dict[int, list[int]] = {}

            async def run(i: int) -> None:
                await trio.sleep(0.05 * i)  # join mid-flight
                body = {"prompt": prompts[i], "max_tokens": 12, "temperature": 0}
                events = await stream_events(client, body)
                together[i] = [data["token_id"] for name, data in events if name == "token"]

            async with trio.open_nursery() as nursery:
                for i in range(len(prompts)):
                    nursery.start_soon(run, i)
            too_long = await client.post("/generate", json={"prompt": "x", "max_tokens": 1024, "stream": False})
    assert health["decode_path"] == "static" and health["max_context"] == 1024
    assert too_long.status_code == 400 and "1024" in json.dumps(too_long.json())
    for i, prompt in enumerate(prompts):
        tokens = list(harmony_encoding().encode(prompt, allowed_special="all"))
        assert together[i] == reference_greedy(tiny_weights, tokens, 12)

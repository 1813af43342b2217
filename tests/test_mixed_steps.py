"""Mixed steps: a prompt that arrives while others decode is prefilled in the same forward as their
tokens, within the profile's step budget (chunked prefill, as vLLM does it).

Breakage each group catches: a plan over its budget, one that mixes with nothing to prefill (a
packed forward where a plain decode is cheaper), or one that starves a prompt when the decoders
fill the budget; a mixed step that is not counted as a decode (the prefills-in-a-row rule then
holds the decoders back) or whose prompt tokens are not counted as prefilled; an out-of-memory
mixed step that loses its decode or its chunk; a mixed forward whose tokens differ from today's
alternating steps (a decode row's segment at the wrong position, a sliding window misapplied to a
prompt longer than it, logits of a chunk that does not end its prompt taken as a token), on the
dynamic and the static path; a running stream that waits out a long prompt's prefill.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
import trio

from actors.messages import Finished, SchedulerEvent, Submit, TokenOut
from actors.metrics import MetricsBook
from actors.metrics_events import MetricsEvent, StepCompleted
from actors.scheduler import GpuScheduler
from app.asgi import config_from_env
from app.batching.batch import Batch
from app.batching.oom import retry_in_halves
from app.batching.plan import SequenceView, halves, plan_step
from app.cli import build_parser, config_from_args
from app.config import PROFILES, ConfigError, Profile
from app.contract.sampling import SamplingParams
from app.contract.step import PrefillChunk, RowOutput, StepOutOfMemory, StepPlan, StepResult
from app.engine.loader import ModelWeights
from app.engine.runner import BaseRunner, ModelRunner
from tests.fakes import FakeBackend, chosen, chosen_logprobs, inline_steps
from tests.test_batch_policy import prefill, request, row
from tests.test_engine import GREEDY, drive, random_prompts, reference_greedy
from tests.test_static_decode import static_runner
from tools import bench_mixed_steps as bench
from tools.gpu_check.frozen_capture import FrozenCapture

MIXING = Profile("test", 4, 8, prefill_chunk_tokens=8, max_consecutive_prefills=2, step_token_budget=6)


# -- the plan ------------------------------------------------------------------------------------------
def test_a_prompt_arriving_while_others_decode_rides_in_the_room_they_leave() -> None:
    views = [SequenceView("a", 0), SequenceView("b", 5), SequenceView("c", 0), SequenceView("d", 7)]
    plan = plan_step(views, consecutive_prefills=0, profile=MIXING)
    # 2 decoding rows + 4 prompt tokens = the budget of 6, prompts in admission order.
    assert plan == StepPlan(("a", "c"), (PrefillChunk("b", 4),))
    assert plan.seq_ids == ("a", "c", "b") and plan.kind == "mixed"
    plan = plan_step([SequenceView("a", 0), SequenceView("b", 1), SequenceView("d", 7)], 0, MIXING)
    assert plan == StepPlan(("a",), (PrefillChunk("b", 1), PrefillChunk("d", 4)))


def test_a_step_mixes_only_while_a_prompt_waits_and_a_lone_prefill_takes_the_chunk() -> None:
    assert plan_step([SequenceView("a", 0), SequenceView("b", 0)], 0, MIXING) == StepPlan(("a", "b"))
    # Nothing decodes: the whole step is prompt, the prefill chunk's size.
    assert plan_step([SequenceView("b", 20)], 0, MIXING) == prefill(("b", 8))
    assert plan_step([], 0, MIXING) is None


def test_without_a_budget_or_room_in_it_prefills_and_decodes_alternate() -> None:
    views = [SequenceView("a", 0), SequenceView("b", 5)]
    off = dataclasses.replace(MIXING, step_token_budget=0)
    assert plan_step(views, 0, off) == prefill(("b", 5))
    assert plan_step(views, 2, off) == StepPlan(("a",))
    full = dataclasses.replace(MIXING, step_token_budget=1)  # the one decoding row fills it
    assert plan_step(views, 0, full) == prefill(("b", 5))
    assert plan_step(views, 2, full) == StepPlan(("a",))


def test_the_budget_is_checked_and_the_shipped_profiles_mix() -> None:
    with pytest.raises(ConfigError, match="step_token_budget"):
        dataclasses.replace(MIXING, step_token_budget=-1)
    assert all(profile.step_token_budget > profile.max_batch_size for profile in PROFILES.values())


def test_the_budget_flag_and_variable_reach_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    def budget(*argv: str) -> int:
        return config_from_args(build_parser().parse_args(list(argv))).profile.step_token_budget

    assert budget() == PROFILES["latency_first"].step_token_budget
    assert budget("--profile", "throughput_first") == PROFILES["throughput_first"].step_token_budget
    assert budget("--step-token-budget", "0") == 0 and budget("--step-token-budget", "64") == 64
    with pytest.raises(ConfigError, match="step_token_budget"):
        budget("--step-token-budget", "-5")
    monkeypatch.setenv("GPTOSS_STEP_TOKEN_BUDGET", "0")
    assert config_from_env().profile.step_token_budget == 0


# -- the batch -----------------------------------------------------------------------------------------
def test_a_mixed_step_moves_the_prompt_on_delivers_the_decodes_and_counts_as_no_prefill() -> None:
    batch: Batch[str] = Batch(MIXING, max_context=100)
    batch.offer(request("a", prompt_length=2))
    work = batch.take_work()
    assert work.plan == prefill(("a", 2))
    batch.apply_step(work.plan, StepResult({"a": row(2, 7)}, "prefill", 1, 2, 0.1), now=1.0)
    batch.offer(request("b", prompt_length=9))
    for step in range(2):
        work = batch.take_work()
        assert work.plan == StepPlan(("a",), (PrefillChunk("b", 5 if step == 0 else 4),))
        rows = {"a": row(3 + step, 8), "b": row(5) if step == 0 else row(9, 9)}
        outcome = batch.apply_step(work.plan, StepResult(rows, "mixed", 2, 6, 0.1, prompt_tokens=5), now=2.0 + step)
        assert [d.request.request_id for d in outcome.deliveries] == (["a"] if step == 0 else ["a", "b"])
        assert outcome.gaps[0] == 1.0, "the running stream got a token every step"
    assert batch.running["b"].prompt_left == 0
    # Two mixed steps in a row are not two prefills in a row: with mixing off now, the next
    # arrival's prefill still goes first.
    batch.profile = dataclasses.replace(MIXING, step_token_budget=0)
    batch.offer(request("c", prompt_length=3))
    plan = batch.take_work().plan
    assert plan is not None and plan.kind == "prefill"


def test_the_prompt_tokens_of_a_mixed_step_are_counted_as_prefilled() -> None:
    state = MetricsBook()
    state.apply(StepCompleted("mixed", 3, 7, 2, 0.1, (0.1, 0.1), prompt_tokens=5))
    state.apply(StepCompleted("prefill", 1, 4, 1, 0.1, (), prompt_tokens=4))
    state.apply(StepCompleted("decode", 2, 2, 2, 0.1, (0.1, 0.1)))
    assert state.snapshot()["tokens"]["prefilled"] == 9
    assert StepResult({}, "prefill", 1, 4, 0.1).prefilled == 4, "a runner that does not say: all of a prefill's"
    assert StepResult({}, "decode", 2, 2, 0.1).prefilled == 0


# -- out of memory -------------------------------------------------------------------------------------
def test_an_out_of_memory_mixed_step_runs_again_as_its_decode_and_its_prefill() -> None:
    plan = StepPlan(("a", "b"), (PrefillChunk("c", 4),))
    assert halves(plan, lambda ids: ([], [])) == [StepPlan(("a", "b")), prefill(("c", 4))]
    ran: list[StepPlan] = []

    def run(part: StepPlan) -> StepResult:
        ran.append(part)
        if part.kind == "mixed":
            raise StepOutOfMemory("too big")
        if part.kind == "prefill":
            return StepResult({"c": row(4, 3)}, "prefill", 1, 4, 0.1)
        return StepResult(dict.fromkeys(part.seq_ids, RowOutput(9, (1,))), "decode", 2, 2, 0.1)

    with pytest.raises(StepOutOfMemory):
        run(plan)
    result = retry_in_halves(plan, run, lambda ids: ([], []))
    assert ran[1:] == [StepPlan(("a", "b")), prefill(("c", 4))]
    assert result.kind == "mixed" and chosen(result) == {"a": 1, "b": 1, "c": 3} and result.failed == {}
    assert result.prefilled == 4 and result.new_tokens == 6


# -- the runners: tokens identical to today's alternating steps ---------------------------------------------
def drive_mixed(
    runner: BaseRunner, prompts: dict[str, list[int]], n: int, joins: dict[str, int], budget: int
) -> tuple[dict[str, list[int]], int]:
    """``drive`` with mixed steps: each step decodes every running sequence and prefills what is
    left of ``budget`` of the prompts that wait. Returns the tokens and the mixed steps run."""
    out: dict[str, list[int]] = {name: [] for name in prompts}
    waiting = sorted(prompts, key=lambda name: joins[name])
    active: list[str] = []
    step = mixed_steps = 0
    while any(len(tokens) < n for tokens in out.values()):
        while waiting and joins[waiting[0]] <= step and runner.free_rows:
            name = waiting.pop(0)
            runner.add(name, prompts[name], GREEDY)
            active.append(name)
        prefilling = [s for s in active if runner.pending_prompt(s) > 0]
        decoding = [s for s in active if runner.pending_prompt(s) == 0]
        room = budget - len(decoding)
        chunks = []
        for name in prefilling:
            take = min(room, runner.pending_prompt(name))
            if take <= 0:
                break
            chunks.append(PrefillChunk(name, take))
            room -= take
        if decoding and chunks:
            result = runner.step(StepPlan(tuple(decoding), tuple(chunks)))
            assert result.kind == "mixed" and result.batch == len(decoding) + len(chunks)
            assert result.prompt_tokens == sum(c.tokens for c in chunks)
            assert set(decoding) <= set(chosen(result)), "every decoding row gets its token"
            mixed_steps += 1
        elif chunks:
            result = runner.prefill(chunks)
        elif decoding:
            result = runner.decode(decoding)
        else:
            step += 1
            continue
        for name, token in chosen(result).items():
            out[name].append(token)
        for name in list(active):
            if len(out[name]) >= n:
                runner.release(name)
                active.remove(name)
        step += 1
        assert step < 10_000
    return out, mixed_steps


def test_mixed_steps_give_todays_greedy_tokens_on_gpt_oss(tiny_weights: ModelWeights) -> None:
    """Prompts of 45 and 70 tokens against the tiny model's 32-token sliding window, in chunks of
    up to 13 next to the decoding rows; six sequences through four rows, so rows move too."""
    n = 20
    prompts = random_prompts(6, 199_000)
    joins = {name: 3 * i for i, name in enumerate(prompts)}
    expected = {name: reference_greedy(tiny_weights, prompt, n) for name, prompt in prompts.items()}

    def runner() -> ModelRunner:
        return ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])

    today = drive(runner(), prompts, n, joins, {name: GREEDY for name in prompts}, chunk=7)
    mixed, mixed_steps = drive_mixed(runner(), prompts, n, joins, budget=16)
    assert mixed == today == expected
    assert mixed_steps >= 8, "the prompts really went in next to decoding rows"


def test_mixed_steps_give_todays_greedy_tokens_on_llama(smollm2_weights: ModelWeights) -> None:
    n = 8
    prompts = random_prompts(4, 49_000, seed=3)
    joins = {name: 2 * i for i, name in enumerate(prompts)}
    expected = {name: reference_greedy(smollm2_weights, prompt, n) for name, prompt in prompts.items()}
    runner = ModelRunner(smollm2_weights.model, max_batch_size=4, max_context=2048, stop_token_ids=[])
    mixed, mixed_steps = drive_mixed(runner, prompts, n, joins, budget=12)
    assert mixed == expected and mixed_steps >= 4


def test_mixed_steps_on_the_static_path_next_to_replayed_decode_graphs(tiny_weights: ModelWeights) -> None:
    """The captured decode graphs stay decode-only (a mixed step's shapes change every step, and
    its packed keys are gathered per row): mixed steps run eagerly on the same slots."""
    n = 16
    prompts = random_prompts(6, 199_000)
    joins = {name: 3 * i for i, name in enumerate(prompts)}
    expected = {name: reference_greedy(tiny_weights, prompt, n) for name, prompt in prompts.items()}
    capture = FrozenCapture()
    runner = static_runner(tiny_weights, capture)
    mixed, mixed_steps = drive_mixed(runner, prompts, n, joins, budget=16)
    assert mixed == expected and mixed_steps >= 8
    assert runner.graphs.captured > 0 and runner.graphs.failure is None, "decode steps still replay graphs"


def test_one_choice_over_every_row_of_a_mixed_step_seeds_logprobs_and_min_tokens(tiny_weights: ModelWeights) -> None:
    """The decoding row and the chunk that ends its prompt are sampled in one call: each with its
    own generator and logprobs, as in separate steps; and a row that must continue gets no stop."""
    prompts = random_prompts(2, 199_000, seed=11)
    a, b = prompts["s0"], prompts["s1"]  # 3 and 45 tokens
    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_k=50, seed=3, logprobs=2)

    def started(stop: list[int]) -> ModelRunner:
        runner = ModelRunner(tiny_weights.model, max_batch_size=2, max_context=512, stop_token_ids=stop)
        runner.add("a", a, sampled)
        runner.prefill([PrefillChunk("a", len(a))])
        runner.add("b", b, dataclasses.replace(sampled, seed=4))
        return runner

    apart = started([])
    decoded, prefilled = apart.decode(["a"]), apart.prefill([PrefillChunk("b", len(b))])
    both = StepPlan(("a",), (PrefillChunk("b", len(b)),))
    mixed = started([]).step(both)
    assert chosen(mixed) == {**chosen(decoded), **chosen(prefilled)}
    assert {seq_id: row.num_computed for seq_id, row in mixed.rows.items()} == {"a": len(a) + 1, "b": len(b)}
    for seq_id, separate in (("a", decoded), ("b", prefilled)):
        together = chosen_logprobs(mixed)[seq_id]
        assert together.logprob == pytest.approx(chosen_logprobs(separate)[seq_id].logprob, abs=1e-4)
        assert [token for token, _ in together.top] == [token for token, _ in chosen_logprobs(separate)[seq_id].top]
    held = started(stop=[chosen(decoded)["a"]]).step(both, must_continue={"a"})
    assert chosen(held)["a"] != chosen(decoded)["a"], "min_tokens: its stop token is masked in a mixed step too"


def test_a_mixed_step_refuses_a_row_still_prefilling(tiny_weights: ModelWeights) -> None:
    runner = ModelRunner(tiny_weights.model, max_batch_size=2, max_context=512, stop_token_ids=[])
    runner.add("a", [5, 6, 7], GREEDY)
    runner.add("b", [8, 9], GREEDY)
    with pytest.raises(ValueError, match="has not finished its prefill"):
        runner.step(StepPlan(("a",), (PrefillChunk("b", 2),)))


# -- the scheduler -------------------------------------------------------------------------------------
def mixing_scheduler(
    backend: object, budget: int, step_seconds: float = 0.01
) -> tuple[GpuScheduler, trio.MemoryReceiveChannel[MetricsEvent]]:
    metrics_send, metrics_receive = trio.open_memory_channel[MetricsEvent](math.inf)
    profile = Profile("test", 4, 8, 64, 2, arrival_window_ms=0, step_token_budget=budget)
    scheduler = GpuScheduler(
        backend,  # type: ignore[arg-type]
        profile,
        4096,
        metrics_send,
        step_caller=inline_steps(step_seconds),
        clock=trio.current_time,
    )
    return scheduler, metrics_receive


def submit(
    scheduler: GpuScheduler, name: str, prompt: tuple[int, ...], max_tokens: int
) -> trio.MemoryReceiveChannel[SchedulerEvent]:
    send, receive = trio.open_memory_channel[SchedulerEvent](max_tokens + 8)
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    scheduler.submit(Submit(name, prompt, greedy, frozenset(), trio.current_time(), send))
    return receive


def step_metrics(metrics: trio.MemoryReceiveChannel[MetricsEvent]) -> list[StepCompleted]:
    steps: list[StepCompleted] = []
    while True:
        try:
            event = metrics.receive_nowait()
        except trio.WouldBlock:
            return steps
        if isinstance(event, StepCompleted):
            steps.append(event)


async def test_a_long_prompt_no_longer_stalls_a_running_stream(autojump_clock: object) -> None:
    backend = FakeBackend()
    scheduler, metrics = mixing_scheduler(backend, budget=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        short = submit(scheduler, "short", (1,), 30)
        short_events = await until_token(short)
        long = submit(scheduler, "long", tuple(range(1, 21)), 2)
        long_events = [event async for event in long]
        short_events += [event async for event in short]
        scheduler.close()
    assert isinstance(long_events[-1], Finished) and isinstance(short_events[-1], Finished)
    assert [e.token_id for e in short_events if isinstance(e, TokenOut)] == list(range(1, 31))
    long_steps = [(kind, ids) for kind, ids in backend.log if "long" in ids]
    # 20 prompt tokens, 4 a step next to the decoding row: five mixed steps, no prefill of its own.
    assert long_steps[:5] == [("mixed", ("short", "long"))] * 5
    assert not any(kind == "prefill" for kind, _ in long_steps)
    steps = step_metrics(metrics)
    mixed = [s for s in steps if s.kind == "mixed"]
    assert len(mixed) == 5 and all(s.prompt_tokens == 4 and s.new_tokens == 5 for s in mixed)
    assert all(len(s.inter_token_seconds) >= 1 for s in mixed), "the running stream got its token in each"


async def test_an_out_of_memory_mixed_step_is_retried_as_its_decode_and_its_prefill(autojump_clock: object) -> None:
    backend = FakeBackend(fail=lambda kind, ids: StepOutOfMemory("CUDA out of memory") if kind == "mixed" else None)
    scheduler, _ = mixing_scheduler(backend, budget=8)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        a = submit(scheduler, "a", (10,), 6)
        first = await until_token(a)
        b = submit(scheduler, "b", (20, 21, 22), 3)
        results = [first + [event async for event in a], [event async for event in b]]
        scheduler.close()
    assert [[e.token_id for e in events if isinstance(e, TokenOut)] for events in results] == [
        list(range(10, 16)),
        [20, 21, 22],
    ]
    first_mixed = backend.log.index(("mixed", ("a", "b")))
    assert backend.log[first_mixed + 1 : first_mixed + 4] == [
        ("free_cached_memory", ()),
        ("decode", ("a",)),
        ("prefill", ("b",)),
    ]


async def test_a_cancel_during_a_mixed_step_frees_its_row_at_the_steps_end(autojump_clock: object) -> None:
    backend = FakeBackend()
    scheduler, _ = mixing_scheduler(backend, budget=3, step_seconds=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        a = submit(scheduler, "a", (10,), 100)
        await until_token(a)
        long = submit(scheduler, "long", tuple(range(1, 41)), 5)
        while backend.log[-1][0] != "mixed":
            await until_token(a)
        # The step after this token is mixed too (37 prompt tokens are left): the abort lands in it.
        await trio.sleep(0.25)
        scheduler.abort("long", "client_disconnect")
        long_events = [event async for event in long]
        steps_then = len(backend.log)
        await until_token(a)
        await until_token(a)
        assert "long" in backend.released
        assert all("long" not in ids for _, ids in backend.log[steps_then:]), "freed before the next step"
        scheduler.abort("a", "client_disconnect")
        scheduler.close()
    assert isinstance(long_events[-1], Finished) and long_events[-1].reason == "cancelled"


async def test_the_scheduler_over_a_real_runner_gives_todays_tokens_with_mixed_steps(
    tiny_weights: ModelWeights,
) -> None:
    """Each request arrives once the one before it decodes, through the scheduler's own plan."""
    n = 12
    prompts = random_prompts(4, 199_000, seed=5)
    expected = {name: reference_greedy(tiny_weights, prompt, n) for name, prompt in prompts.items()}
    runner = ModelRunner(tiny_weights.model, max_batch_size=4, max_context=4096, stop_token_ids=[])
    scheduler, metrics = mixing_scheduler(runner, budget=12, step_seconds=0.0)
    events: dict[str, list[SchedulerEvent]] = {}
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            channels = {}
            for name, prompt in prompts.items():
                channels[name] = submit(scheduler, name, tuple(prompt), n)
                events[name] = await until_token(channels[name])
            for name, channel in channels.items():
                events[name] += [event async for event in channel]
            scheduler.close()
    assert {name: [e.token_id for e in got if isinstance(e, TokenOut)] for name, got in events.items()} == expected
    assert any(step.kind == "mixed" for step in step_metrics(metrics))


async def until_token(channel: trio.MemoryReceiveChannel[SchedulerEvent]) -> list[SchedulerEvent]:
    """The events up to and with the request's first token: from then on it decodes."""
    events: list[SchedulerEvent] = []
    while not events or not isinstance(events[-1], TokenOut):
        events.append(await channel.receive())
    return events


# -- the benchmark tool --------------------------------------------------------------------------------
def test_the_benchmark_runs_both_modes_over_the_same_workload(tiny_weights: ModelWeights) -> None:
    """Its figures are timings (not checked here); what each mode ran is behaviour."""
    args = argparse.Namespace(
        seed=0, streams=1, arrivals=1, prompt_tokens=40, arrival_tokens=2, arrival_every=1, warmup_steps=1
    )
    work = bench.Workload(args, vocab=199_000)
    runner = ModelRunner(tiny_weights.model, max_batch_size=2, max_context=512, stop_token_ids=[])
    on = dataclasses.replace(PROFILES["latency_first"], max_batch_size=2, step_token_budget=16)
    off = dataclasses.replace(on, step_token_budget=0)
    without = bench.run_phase(runner, off, work, 512)
    assert runner.sequence_ids() == []
    with_mixing = bench.run_phase(runner, on, work, 512)
    assert without.steps["prefill"] == 1 and "mixed" not in without.steps
    assert with_mixing.steps["mixed"] == 3 and "prefill" not in with_mixing.steps, "40 tokens, 15 a step"
    assert len(without.ttft) == len(with_mixing.ttft) == 1 and with_mixing.gaps

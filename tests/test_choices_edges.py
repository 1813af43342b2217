"""Choices that fail, choices past --max-streams, and heartbeats, on the tiny gpt-oss (one server).

The server's runner fails the forked choices of prompts that hold a marker token (their logits are
"not a number"), so one choice of a request fails while its parent runs on; its steps are slow
enough that a stream waits between tokens.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from app.contract.sampling import SamplingParams
from app.contract.step import StepPlan, StepResult
from app.engine.loader import ModelWeights
from tests.conftest import running_server, server_config, wait_for_stats
from tests.fakes import slow_steps

MARKER = 7777
STEP_SECONDS = 0.1


class ForkedChildrenFail:
    """Wraps a real runner: a forked sequence whose prompt holds MARKER gets no token from any
    step (it fails alone, as a sequence with non-finite logits does); the others are untouched."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._failing: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def add(
        self,
        seq_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        stop_token_ids: Iterable[int] | None = None,
        fork_from: str | None = None,
    ) -> int:
        if fork_from is not None and MARKER in prompt:
            self._failing.add(seq_id)
        return int(self._runner.add(seq_id, prompt, params, stop_token_ids, fork_from))

    def release(self, seq_id: str) -> None:
        self._failing.discard(seq_id)
        self._runner.release(seq_id)

    def step(self, plan: StepPlan, must_continue: Collection[str] = ()) -> StepResult:
        result: StepResult = self._runner.step(plan, must_continue)
        failing = self._failing.intersection(seq_id for seq_id, row in result.rows.items() if row.tokens)
        rows = {seq_id: row for seq_id, row in result.rows.items() if seq_id not in failing}
        return dataclasses.replace(
            result, rows=rows, failed={**result.failed, **dict.fromkeys(failing, "non_finite_logits")}
        )


def failing_children(loaded: Any) -> Any:
    return dataclasses.replace(loaded, runner=ForkedChildrenFail(loaded.runner))


def sse_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


async def test_failing_choices_a_stream_cap_and_heartbeats(tiny_weights: ModelWeights) -> None:
    config = server_config(max_streams=3, heartbeat_seconds=0.03)
    async with (
        running_server(
            tiny_weights, config, step_caller=slow_steps(STEP_SECONDS), runner_hook=failing_children
        ) as server,
        server.client() as client,
    ):
        bad = {"prompt": [1000, 1001, MARKER, 1002], "n": 2, "max_tokens": 6, "temperature": 0.7, "cache": False}

        # Breakage caught: the parent runs on for nobody, or the response ends as if complete.
        streamed = await client.post("/v1/completions", json={**bad, "stream": True})
        assert streamed.status_code == 200
        lines = sse_lines(streamed.text)
        assert lines[-1] == "data: [DONE]"
        data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert "error" in data[-1] and data[-1]["error"]["code"] == "non_finite_logits"
        assert not any(chunk.get("choices") and chunk["choices"][0]["finish_reason"] == "length" for chunk in data)
        assert lines.count(": keep-alive") >= 1, "heartbeats while the choices wait for their steps"
        await wait_for_stats(
            client, lambda s: s["active_sequences"] == 0 and s["cancelled_requests"] == 1, server=server
        )

        # Breakage caught: a 200 with one choice missing, or a 500 that leaves the parent running.
        whole = await client.post("/v1/completions", json=bad)
        assert whole.status_code == 500, whole.text
        assert whole.json()["error"]["code"] == "non_finite_logits"
        await wait_for_stats(
            client, lambda s: s["active_sequences"] == 0 and s["cancelled_requests"] == 2, server=server
        )

        # --max-streams counts each choice. Breakage caught: the opened choices left running.
        fine = {"prompt": [1000, 1001, 1002], "max_tokens": 4, "temperature": 0.7, "cache": False}
        refused = await client.post("/v1/completions", json={**fine, "n": 4})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"

        def nothing_left(stats: dict[str, Any]) -> bool:
            (figures,) = stats["model_metrics"].values()
            return bool(stats["active_sequences"] == figures["active_streams"] == figures["active_generations"] == 0)

        stats = await wait_for_stats(client, nothing_left, server=server)
        assert stats["cancelled_requests"] == 5, "the three opened were cancelled"
        served = await client.post("/v1/completions", json={**fine, "n": 3})
        assert served.status_code == 200
        assert [c["index"] for c in served.json()["choices"]] == [0, 1, 2]
        assert served.json()["usage"]["completion_tokens"] == 3 * 4

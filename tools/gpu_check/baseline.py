"""Plain ``generate()`` on the same model: the baseline the server is set against."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from tools.gpu_check.plan import Plan


def prompt_ids(count: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 190_000, (count, length), generator=generator)


def greedy_generate(
    plan: Plan, model: Any, ids: torch.Tensor, new_tokens: int, streamer: BaseStreamer | None = None
) -> torch.Tensor:
    """Exactly ``new_tokens`` greedy tokens after each row of ``ids``: [rows, new_tokens]."""
    ids = ids.to(plan.device)
    out: torch.Tensor = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        streamer=streamer,
    )
    return out[:, ids.shape[1] :]


class StepClock(BaseStreamer):
    """When each step's new tokens reached the host (generate() copies them there for a streamer
    as it checks whether to stop, which synchronises anyway); the prompt, handed over first, is not
    a step and is told apart by its size."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.numel() == self.batch:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.times, self.times[1:], strict=False)]


def decode_gaps(plan: Plan, model: Any, ids: torch.Tensor, new_tokens: int) -> list[float]:
    """Seconds between consecutive new tokens of one greedy generate(): each one decode step (the
    prefill comes before the first token, so it is in none of them)."""
    clock = StepClock(ids.shape[0])
    greedy_generate(plan, model, ids, new_tokens, clock)
    return clock.gaps()


def generate_decode_rate(plan: Plan, model: Any, batch: int, tokens: int, limit: float) -> dict[str, float]:
    """Decode tokens/s of plain generate() from the median step of one run, its length fitted to
    ``limit``: a median, as a burst of other work on the machine stretches a step or two, not all."""
    ids = prompt_ids(batch, 16)
    probe = decode_gaps(plan, model, ids, 3)  # also the warm-up
    steps = max(2, min(tokens - 1, int(limit * 0.6 / max(statistics.median(probe), 1e-4))))
    step = statistics.median(decode_gaps(plan, model, ids, steps + 1))
    return {"steps": steps, "step_ms": round(step * 1000, 2), "tok_s": round(batch / step, 1)}

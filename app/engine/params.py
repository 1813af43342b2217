"""What a request asks of generation: sampling and stopping. Plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenised text by the relay

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def deterministic(self) -> bool:
        """The same request gives the same tokens: greedy, or sampled from a fixed seed."""
        return self.greedy or self.seed is not None

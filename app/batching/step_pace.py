"""How many prompt tokens a mixed step may carry so that it stays within a multiple of a decode
step: the running streams' inter-token latency is then bounded, on any machine.

A fixed budget cannot do it: on a GPU a decode step is bound by reading the weights and a few
hundred prompt tokens beside it are almost free, while on a CPU every prompt token costs compute
(SmolLM2 on 2 cores: a 4-stream decode step 120 ms, each prompt token beside it about 2.5 ms more,
so the profile's 256 tokens made the streams wait 6x). The pace learns both costs from the steps
it sees: a decode step's seconds, and a prompt token's marginal seconds in a mixed step (in a
prefill step, its average). Until it has seen both, the budget alone decides.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_CHUNK = 16  # prompt tokens a mixed step always carries: a waiting prompt always gets in
_WEIGHT = 0.3  # of the newest step in each running estimate


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1 - _WEIGHT) * old + _WEIGHT * new


@dataclass(slots=True)
class StepPace:
    decode_seconds: float | None = None  # a decode step over the running batch
    token_seconds: float | None = None  # one prompt token's cost on top of a step

    def observe(self, kind: str, seconds: float, prompt_tokens: int) -> None:
        if seconds <= 0:
            return
        if kind == "decode":
            self.decode_seconds = _blend(self.decode_seconds, seconds)
        elif kind == "prefill" and prompt_tokens > 0 and self.token_seconds is None:
            # A first guess only: a whole prefill step's average also pays for reading the weights.
            self.token_seconds = seconds / prompt_tokens
        elif kind == "mixed" and prompt_tokens > 0 and self.decode_seconds is not None:
            extra = max(seconds - self.decode_seconds, 0.0)
            self.token_seconds = _blend(self.token_seconds, extra / prompt_tokens)

    def prompt_room(self, room: int, slowdown: float) -> int:
        """Of ``room`` prompt tokens the budget leaves, how many keep a mixed step within
        ``slowdown`` times a decode step (0: no bound but the budget)."""
        if slowdown <= 0 or self.decode_seconds is None or not self.token_seconds:
            return room
        fits = int((slowdown - 1.0) * self.decode_seconds / self.token_seconds + 1e-6)  # not 59.999.. for 60
        return max(min(room, MIN_CHUNK), min(room, fits))

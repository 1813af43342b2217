"""The knobs of the P0 plan."""

from __future__ import annotations

from dataclasses import dataclass, field

from tools.p0.load import LoadSettings


@dataclass(frozen=True, slots=True)
class PlanSettings:
    """The knobs of the plan; the defaults fit a few minutes on smollm2-135m on a CPU."""

    hit_rate_min: float = 0.30
    determinism_prompts: int = 10  # distinct seeded greedy requests, each sent determinism_rounds times
    determinism_rounds: int = 3
    cancel_within_s: float = 1.0
    # Tokens the server may generate for a dropped stream beyond those its client read: the step
    # in flight when the disconnect arrives, and one more for a disconnect that lands just after
    # the next step was planned.
    tokens_after_drop_max: int = 2
    settle_s: float = 5.0  # how long a dropped stream's sequence may take to leave the batch
    perf: LoadSettings = field(default_factory=LoadSettings)
    perf_profile: str = "latency_first"
    ttft_p95_max_s: float = 7.0
    e2e_p95_max_s: float = 20.0
    error_rate_max: float = 0.005
    load: LoadSettings = field(
        default_factory=lambda: LoadSettings(concurrency=8, requests=120, max_tokens=32, disconnect_share=0.25, seed=1)
    )
    warmup_share: float = 0.2  # the first part of the load run that may grow memory freely
    growth_max_mib_per_100: float = 32.0
    sample_every_s: float = 0.25
    progress: bool = True

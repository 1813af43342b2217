"""The comparison behind tools/bench_vs_transformers.py: both servers' figures per concurrency level,
their ratios, the table, the verdict against issue 5's bar, the JSON record and the latency plot."""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tools.chat_load import THIS_SERVER, TRANSFORMERS_SERVE, Phase, PhaseFigures, phase_figures


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


@dataclass(frozen=True)
class Comparison:
    concurrency: int
    ours: PhaseFigures
    theirs: PhaseFigures

    def ratios(self) -> dict[str, float | None]:
        return {
            name: ratio(getattr(self.ours, name), getattr(self.theirs, name))
            for name in ("ttft_p50", "ttft_p95", "e2e_p50", "e2e_p95", "tokens_per_s")
        }


def compare(ours: Sequence[Phase], theirs: Sequence[Phase]) -> list[Comparison]:
    by_level = {phase.concurrency: phase for phase in theirs}
    return [
        Comparison(phase.concurrency, phase_figures(phase), phase_figures(by_level[phase.concurrency]))
        for phase in ours
        if phase.concurrency in by_level
    ]


def render_table(comparisons: Sequence[Comparison]) -> str:
    """A Markdown table: both servers and the ratio ours / theirs, per concurrency level."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        "| concurrency | server | TTFT p50 s | TTFT p95 s | E2E p50 s | E2E p95 s | tok/s | ok / failed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in comparisons:
        for name, f in ((THIS_SERVER.name, row.ours), (TRANSFORMERS_SERVE.name, row.theirs)):
            cells = [seconds(v) for v in (f.ttft_p50, f.ttft_p95, f.e2e_p50, f.e2e_p95)]
            lines.append(
                f"| {row.concurrency} | {name} | {' | '.join(cells)} | {f.tokens_per_s:.1f} | {f.ok} / {f.failed} |"
            )
        r = row.ratios()
        cells = [times(r[name]) for name in ("ttft_p50", "ttft_p95", "e2e_p50", "e2e_p95", "tokens_per_s")]
        lines.append(f"| {row.concurrency} | ours / theirs | {' | '.join(cells)} | |")
    return "\n".join(lines)


def token_notes(comparisons: Sequence[Comparison]) -> list[str]:
    """How long the replies were and where the counts came from: the load is only the same if
    both servers generated the same number of tokens for the same prompt."""
    notes = []
    for row in comparisons:
        for name, f in ((THIS_SERVER.name, row.ours), (TRANSFORMERS_SERVE.name, row.theirs)):
            prompt = "-" if f.prompt_tokens_mean is None else f"{f.prompt_tokens_mean:.1f}"
            notes.append(
                f"concurrency {row.concurrency}, {name}: {f.tokens_min}-{f.tokens_max} tokens per reply "
                f"(counted from {' and '.join(f.token_sources) or 'nothing'}), mean prompt {prompt} tokens"
                + (f"; first failure: {f.first_error}" if f.first_error else "")
            )
    return notes


@dataclass(frozen=True)
class Verdict:
    passed: bool | None  # None: the bar's concurrency level was not measured
    message: str


def verdict(comparisons: Sequence[Comparison], bar_concurrency: int) -> Verdict:
    """Issue 5's bar: at that concurrency this server gives more tokens/s and a lower p95 TTFT,
    with no failed requests."""
    row = next((c for c in comparisons if c.concurrency == bar_concurrency), None)
    if row is None:
        return Verdict(None, f"no verdict: concurrency {bar_concurrency} was not measured")
    ours, theirs = row.ours, row.theirs
    faster = ours.tokens_per_s > theirs.tokens_per_s
    sooner = ours.ttft_p95 is not None and (theirs.ttft_p95 is None or ours.ttft_p95 < theirs.ttft_p95)
    whole = ours.failed == 0 and ours.ok > 0
    passed = faster and sooner and whole
    r = row.ratios()
    tok = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.2f}x"
    ttft = "-" if r["ttft_p95"] is None else f"{r['ttft_p95']:.2f}x"
    message = (
        f"at concurrency {bar_concurrency}: tokens/s {tok} theirs (needs > 1), p95 TTFT {ttft} theirs "
        f"(needs < 1), {ours.failed} failed requests (needs 0): {'PASS' if passed else 'FAIL'}"
    )
    return Verdict(passed, message)


def environment() -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
    }


def to_json(
    settings: dict[str, Any], phases: Sequence[Phase], comparisons: Sequence[Comparison], outcome: Verdict
) -> dict[str, Any]:
    return {
        "settings": settings,
        "environment": environment(),
        "comparisons": [
            {
                "concurrency": c.concurrency,
                "ours": dataclasses.asdict(c.ours),
                "theirs": dataclasses.asdict(c.theirs),
                "ratios_ours_over_theirs": c.ratios(),
            }
            for c in comparisons
        ],
        "verdict": {"passed": outcome.passed, "message": outcome.message},
        "requests": [
            {"server": p.server, "concurrency": p.concurrency, "wall_s": p.wall, **dataclasses.asdict(r)}
            for p in phases
            for r in p.results
        ],
    }


def plot(phases: Sequence[Phase], path: Path, title: str) -> None:
    """Empirical CDFs of TTFT (top row) and E2E (bottom row), one column per concurrency level,
    both servers on each axis."""
    from matplotlib.figure import Figure  # Agg, without pyplot's global state

    levels = sorted({p.concurrency for p in phases})
    figure = Figure(figsize=(5 * len(levels), 7), layout="constrained")
    axes = figure.subplots(2, len(levels), squeeze=False)
    for column, level in enumerate(levels):
        for row, (metric, label) in enumerate((("ttft", "TTFT"), ("e2e", "E2E"))):
            ax = axes[row][column]
            for phase in (p for p in phases if p.concurrency == level):
                values = sorted(v for r in phase.results if r.ok and (v := getattr(r, metric)) is not None)
                if values:
                    shares = [i / len(values) for i in range(len(values) + 1)]
                    ax.step([values[0], *values], shares, where="post", label=phase.server)
            ax.set_title(f"{label}, concurrency {level}")
            ax.set_xlabel("seconds")
            ax.set_ylabel("share of requests")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)

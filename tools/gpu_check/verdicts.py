"""The table's rows, and every reason the run fails: each one a line, the exit status 1.

A run fails on a phase that failed, was skipped or did not finish; when graphs were asked for, on
a capture that failed or captured nothing, on graphs that were never replayed, on replayed tokens
that differ from eager ones (always) or from generate()'s (in float32); on a stream phase that
did not complete; and on a target missed or left without a figure.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from tools.gpu_check.report import Report


class Row(NamedTuple):
    measure: str
    plain_generate: float | None
    server: float | None
    target: str  # "" where the row has none
    verdict: str  # "met", "MISSED", "n/a" (no figure) or "" (no target)


def figure_text(value: float | None) -> str:
    return "-" if value is None else f"{value:,.3f}" if value < 10 else f"{value:,.1f}"


def _row(measure: str, generated: float | None, served: float | None, target: float | None, higher: bool) -> Row:
    if target is None:
        return Row(measure, generated, served, "", "")
    text = f">= {target:g}" if higher else f"< {target:g}"
    if served is None:
        return Row(measure, generated, served, text, "n/a")
    met = served >= target if higher else served < target
    return Row(measure, generated, served, text, "met" if met else "MISSED")


def rows(report: Report) -> list[Row]:
    plan, figures, targets = report.plan, report.figures, report.plan.targets
    batch, top = plan.generate_batch, max(plan.stream_counts)
    out = [
        _row(
            "decode tok/s, 1 stream",
            figures.get("generate_decode_1"),
            figures.get("server_decode_1"),
            targets.decode_1,
            True,
        )
    ]
    for count in plan.stream_counts:
        out.append(
            _row(
                f"aggregate tok/s, {count} streams",
                figures.get(f"generate_aggregate_{batch}") if count == batch else None,
                figures.get(f"server_aggregate_{count}"),
                targets.aggregate if count == top else None,
                True,
            )
        )
    if batch not in plan.stream_counts:
        out.append(
            _row(f"aggregate tok/s, batch {batch}", figures.get(f"generate_aggregate_{batch}"), None, None, True)
        )
    ttft = f"p95 TTFT s, {plan.ttft_streams} streams x {plan.ttft_prompt_tokens}-token prompts"
    out.append(_row(ttft, None, figures.get("server_ttft_p95"), targets.ttft_p95, False))
    return out


def failures(report: Report) -> list[str]:
    return [*_phase_failures(report), *_graph_failures(report), *_stream_failures(report), *_target_failures(report)]


def _phase_failures(report: Report) -> list[str]:
    out = []
    for name, phase in report.phases.items():
        status = phase.get("status")
        if status == "running":
            out.append(f"{name} did not finish")
        elif status == "failed":
            out.append(f"{name} failed: {phase.get('error')}")
        elif status != "ok":
            out.append(f"{name} {status}")
    return out


def _capture_failure(record: dict[str, Any]) -> str | None:
    if record.get("graph_failure"):
        return str(record["graph_failure"])
    trace = record.get("capture_traceback")
    return str(trace).strip().splitlines()[-1] if trace else None


def _graph_failures(report: Report) -> list[str]:
    if not report.plan.cuda_graphs:
        return []
    out = []
    check = report.phases.get("graphs_vs_eager", {})
    if check.get("status") == "ok":
        if (failure := _capture_failure(check)) is not None:
            out.append(f"graph capture failed in graphs_vs_eager: {failure}")
        elif not check["graphs_captured"]:
            out.append("graphs_vs_eager captured no graphs")
        elif not check["graph_replays"]:
            out.append("graphs_vs_eager replayed none of its graphs")
        if not check["graphs_equal_eager"]:
            out.append(f"graphs differ from eager at token {check['first_difference_from_eager']}")
        if report.plan.exact and check["agree_with_generate"] < len(check["generate"]):
            out.append(f"graphs differ from generate() at token {check['agree_with_generate']}")
    server = report.info.get("server")
    if server is not None:
        if (failure := _capture_failure(server)) is not None:
            out.append(f"graph capture failed in the server: {failure}")
        elif not server["graphs_captured"]:
            out.append(f"the server captured no graphs (decode path {server['decode_path']})")
        if server.get("graph_replays_serving") == 0:
            out.append("the server's decode steps replayed no graphs")
    return out


def _stream_failures(report: Report) -> list[str]:
    return [
        f"{name} did not complete: {phase['streams_done']} of {phase['streams']} streams in {phase['seconds']} s"
        for name, phase in report.phases.items()
        if phase.get("status") == "ok" and phase.get("complete") is False
    ]


def _target_failures(report: Report) -> list[str]:
    out = []
    for row in rows(report):
        if row.verdict == "MISSED":
            out.append(f"{row.measure}: {figure_text(row.server)} misses the target {row.target}")
        elif row.verdict == "n/a":
            out.append(f"{row.measure}: no figure to meet the target {row.target}")
    return out

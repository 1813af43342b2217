"""The run as a table on stdout and as JSON, with the reasons it failed at the end of both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tools.gpu_check.report import Report
from tools.gpu_check.verdicts import failures, figure_text, rows


def preflight_line(preflight: dict[str, Any]) -> str:
    where = preflight["device"]
    if "gpu" in preflight:
        where += f" ({preflight['gpu']}, compute capability {preflight['capability']})"
    return (
        f"preflight: device {where}; torch.nn.functional.grouped_mm "
        f"{'present' if preflight['grouped_mm'] else 'ABSENT'}; experts {preflight['experts']}, "
        f"attention {preflight['attention']}"
    )


def graphs_line(report: Report) -> str | None:
    check = report.phases.get("graphs_vs_eager", {})
    if check.get("status") != "ok":
        return None
    tokens = len(check["generate"])
    same = "equal" if check["graphs_equal_eager"] else f"differ at token {check['first_difference_from_eager']}"
    return (
        f"graphs vs eager over {tokens} greedy tokens: {same} ({check['graphs_captured']} captured, "
        f"{check['graph_replays']} replays); agree with generate() for {check['agree_with_generate']} of {tokens}"
    )


def render(report: Report) -> str:
    table = rows(report)
    header = ("measure", "plain generate()", "this server", "target", "")
    lines = [
        header,
        *((r.measure, figure_text(r.plain_generate), figure_text(r.server), r.target, r.verdict) for r in table),
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    text = [
        "  ".join(col.ljust(widths[i]) if i == 0 else col.rjust(widths[i]) for i, col in enumerate(line))
        for line in lines
    ]
    info = report.info
    where = info.get("preflight", {}).get("gpu") or info.get("cpu", "?")
    server = info.get("server", {})
    model = info.get("model", {})
    title = (
        f"gpu_check ({report.plan.mode}) on {where}: torch {info.get('torch')}, transformers "
        f"{info.get('transformers')}; {model.get('parameters', 0) / 1e9:.2f}B parameters, "
        f"{model.get('dtype')}, experts {model.get('experts')}; server decode path "
        f"{server.get('decode_path')}, {server.get('graphs_captured', 0)} graphs, "
        f"{server.get('graph_replays_serving', 0)} replays serving"
    )
    graphs = graphs_line(report)
    reasons = [f"FAIL: {reason}" for reason in failures(report)]
    verdict = f"{len(reasons)} failure(s)" if reasons else "PASS"
    return "\n".join(
        [
            title,
            "-" * len(title),
            *text,
            *([graphs] if graphs else []),
            *reasons,
            f"{verdict}, total {report.elapsed():.1f} s",
        ]
    )


def to_json(report: Report) -> dict[str, Any]:
    return {
        "finished": report.finished,
        "failures": failures(report),
        "info": report.info,
        "rows": [row._asdict() for row in rows(report)],
        "figures": report.figures,
        "phases": report.phases,
        "total_s": round(report.elapsed(), 2),
    }


def write_json(report: Report, path: Path) -> None:
    """Whole or not at all: a reader (or a killed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(to_json(report), indent=2, default=str))
    partial.replace(path)

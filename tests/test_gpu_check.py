"""tools/gpu_check end to end on the CPU (--cpu-smoke): the static path's decode steps captured by
the frozen stand-in, in the graphs-vs-eager phase and in the served server; and the runs that must
exit 1."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tools.gpu_check import __main__ as cli
from tools.gpu_check.build import model_config
from tools.gpu_check.capture import CaptureLog, capture_factory
from tools.gpu_check.frozen_capture import FrozenCapture
from tools.gpu_check.output import write_json
from tools.gpu_check.plan import Plan, Targets, gpu_plan, smoke_plan
from tools.gpu_check.report import Report
from tools.gpu_check.verdicts import failures


def short_plan(**changes: Any) -> Plan:
    """The smoke plan with fewer streams and tokens, for the runs that must fail."""
    fewer = {"generate_tokens": 3, "generate_batch": 2, "generate_batch_tokens": 3, "check_tokens": 4}
    return smoke_plan(**{**fewer, "stream_tokens": 4, "stream_counts": (2,), "ttft_streams": 2, **changes})


def test_gpu_check_smoke_run_passes_on_replayed_graphs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a smoke run that does not capture: the graphs phase or the server on eager steps
    (a capture that is not handed through serve_weights, or the eager path instead of the stand-in)
    compares eager with eager and can never fail; and a sound build that the verdict fails (smoke
    targets out of reach of a 2-core CPU, a check that misreads its own figures)."""
    assert capture_factory(smoke_plan()) is FrozenCapture, "the smoke run captures with the stand-in"
    out = tmp_path / "check.json"
    assert cli.main(["--cpu-smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("preflight: device cpu; torch.nn.functional.grouped_mm ")
    report = json.loads(out.read_text())
    assert report["finished"] is True and report["failures"] == []
    assert {name: phase["status"] for name, phase in report["phases"].items()} == dict.fromkeys(
        [
            "build",
            "generate_1",
            "generate_batch",
            "graphs_vs_eager",
            "server_start",
            "server_1_stream",
            "server_2_streams",
            "server_3_streams",
            "server_4_streams",
            "server_ttft",
        ],
        "ok",
    )
    assert all(value is not None and value > 0 for value in report["figures"].values()), report["figures"]
    check = report["phases"]["graphs_vs_eager"]
    assert check["graph_captures"] == check["graphs_captured"] >= 1 and check["graph_failure"] is None
    assert check["graph_replays"] == 5, "every decode step after the prefill's token replayed the stand-in"
    assert check["graphs"] == check["eager"] == check["generate"] and len(check["graphs"]) == 6
    server = report["info"]["server"]
    assert server["decode_path"] == "static+cuda_graphs" and server["graph_failure"] is None
    assert server["graphs_captured"] == server["graph_captures_end"] == 3, "batch buckets 1, 2, 4 at start-up"
    assert server["graph_replays_serving"] >= 7, "the 1-stream phase alone has 7 decode steps"
    served = report["info"]["server_stats"]["requests"]
    assert served["cached"] == 0 and served["ok"] == 1 + 2 + 3 + 4 + 4, "every stream was generated, none replayed"
    measures = [row["measure"] for row in report["rows"]]
    assert measures[0] == "decode tok/s, 1 stream" and measures[-1].startswith("p95 TTFT")
    assert [row["verdict"] for row in report["rows"] if row["target"]] == ["met", "met", "met"]
    assert "\nPASS, total " in printed
    assert report["total_s"] < 120


class ArgmaxFlippingCapture(FrozenCapture):
    """Replays the captured step faithfully, then negates its logits: every greedy token taken from a
    replay is the least likely one instead of the most likely."""

    def __call__(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        replay = super().__call__(step)
        return lambda: -replay()


def test_graphs_that_differ_from_eager_fail_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a tool that does not compare replayed tokens with eager ones (or with generate()'s
    in float32), or that compares but still exits 0, or leaves the reason out of the output."""
    out = tmp_path / "check.json"
    assert cli.check(short_plan(), out, new_capture=ArgmaxFlippingCapture) == 1
    report = json.loads(out.read_text())
    check = report["phases"]["graphs_vs_eager"]
    assert check["graphs"][0] == check["eager"][0] and check["graphs"][1] != check["eager"][1], "prefill is eager"
    assert "graphs differ from eager at token 1" in report["failures"]
    assert "graphs differ from generate() at token 1" in report["failures"]
    assert "\nFAIL: graphs differ from eager at token 1\n" in capsys.readouterr().out


def test_missed_targets_fail_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a verdict that ignores the plan's targets, or marks them but still exits 0."""
    out = tmp_path / "check.json"
    impossible = Targets(decode_1=1e9, aggregate=1e9, ttft_p95=0.0)
    assert cli.check(short_plan(targets=impossible), out) == 1
    report = json.loads(out.read_text())
    assert [row["verdict"] for row in report["rows"] if row["target"]] == ["MISSED", "MISSED", "MISSED"]
    failures = report["failures"]
    assert len(failures) == 3, failures
    assert failures[0].startswith("decode tok/s, 1 stream: ") and failures[0].endswith("misses the target >= 1e+09")
    assert failures[1].startswith("aggregate tok/s, 2 streams: ")
    assert failures[2].startswith("p95 TTFT s, 2 streams x 64-token prompts: ") and failures[2].endswith("< 0")
    printed = capsys.readouterr().out
    assert all(f"\nFAIL: {reason}\n" in printed for reason in failures)


def sound_report(plan: Plan) -> Report:
    """What a passing run of ``plan`` records, as far as the verdicts read it."""
    report = Report(plan)
    tokens = [5, 6, 7, 8]
    report.phases["graphs_vs_eager"] = {
        "status": "ok",
        "graphs": tokens,
        "eager": list(tokens),
        "generate": list(tokens),
        "graphs_captured": 1,
        "graph_failure": None,
        "graph_captures": 1,
        "graph_replays": 3,
        "capture_traceback": None,
        "graphs_equal_eager": True,
        "first_difference_from_eager": None,
        "agree_with_generate": 4,
    }
    report.phases["server_start"] = {"status": "ok"}
    report.info["server"] = {
        "decode_path": "static+cuda_graphs",
        "graphs_captured": 3,
        "graph_failure": None,
        "capture_traceback": None,
        "graph_replays_serving": 40,
    }
    for count in plan.stream_counts:
        report.phases[f"server_{count}_streams"] = {"status": "ok", "complete": True, "streams": count, "seconds": 1}
        report.figures[f"server_aggregate_{count}"] = 1e6
    report.figures |= {"server_decode_1": 1e6, "server_ttft_p95": 0.0}
    return report


def test_each_reason_to_fail_is_named() -> None:
    """Catches a verdict that lets a failed capture, a capture of nothing, a server that never
    replays, an unfinished phase or stream phase pass; and one that fails bf16 runs for a short
    agreement with generate(), which random weights in bf16 may give a sound build."""
    assert failures(sound_report(smoke_plan())) == []
    broken = sound_report(smoke_plan())
    broken.phases["graphs_vs_eager"] |= {
        "graph_failure": "CaptureError: not capturable inside a decode step: ['aten._local_scalar_dense']",
        "capture_traceback": "Traceback (most recent call last):\n ...",
    }
    broken.info["server"] |= {"graphs_captured": 0, "decode_path": "static", "graph_replays_serving": 0}
    broken.phases["server_4_streams"] |= {"complete": False, "streams_done": 3}
    broken.phases["server_ttft"] = {"status": "running"}
    assert failures(broken) == [
        "server_ttft did not finish",
        "graph capture failed in graphs_vs_eager: CaptureError: not capturable inside a decode step: "
        "['aten._local_scalar_dense']",
        "the server captured no graphs (decode path static)",
        "the server's decode steps replayed no graphs",
        "server_4_streams did not complete: 3 of 4 streams in 1 s",
    ]
    nothing = sound_report(smoke_plan())
    nothing.phases["graphs_vs_eager"] |= {"graphs_captured": 0, "graph_captures": 0, "graph_replays": 0}
    assert failures(nothing) == ["graphs_vs_eager captured no graphs"]
    for plan, expected in ((gpu_plan(), []), (smoke_plan(), ["graphs differ from generate() at token 2"])):
        diverged = sound_report(plan)
        diverged.phases["graphs_vs_eager"] |= {"generate": [5, 6, 9, 9], "agree_with_generate": 2}
        assert failures(diverged) == expected, plan.dtype
    assert failures(sound_report(smoke_plan(cuda_graphs=False))) == []


def test_the_json_is_written_as_each_phase_begins_and_ends(tmp_path: Path) -> None:
    """Catches a record written only at the end, which a run that hangs or is killed in a phase
    (a capture, on a GPU) would leave empty; and a failed phase that loses its traceback."""
    out = tmp_path / "check.json"
    report = Report(smoke_plan(), checkpoint=lambda report: write_json(report, out))
    seen: list[str] = []

    def hangs_here() -> dict[str, Any]:
        seen.append(json.loads(out.read_text())["phases"]["build"]["status"])
        raise RuntimeError("out of memory")

    report.run("build", hangs_here)
    written = json.loads(out.read_text())
    assert seen == ["running"] and written["phases"]["build"]["status"] == "failed"
    assert "in hangs_here" in written["phases"]["build"]["traceback"]
    assert written["finished"] is False and written["failures"][0] == "build failed: RuntimeError: out of memory"


def test_a_failed_capture_keeps_its_whole_traceback() -> None:
    """Catches a capture failure cut to one line (as StepGraphs keeps it), which hides where in the
    step the capture broke."""
    log = CaptureLog(FrozenCapture())

    def breaks_inside_the_step() -> torch.Tensor:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError):
        log(breaks_inside_the_step)
    record = log.record()
    assert record["graph_captures"] == 0 and record["graph_replays"] == 0
    trace = str(record["capture_traceback"])
    assert "in breaks_inside_the_step" in trace and "frozen_capture.py" in trace
    assert trace.strip().endswith("operation not permitted when stream is capturing")


def test_the_20b_shape() -> None:
    config = model_config(gpu_plan())
    assert (config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok) == (24, 32, 4)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (2880, 64, 8)
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"] and len(config.layer_types) == 24
    assert gpu_plan().targets == Targets(decode_1=100.0, aggregate=2000.0, ttft_p95=1.0)

"""tools/bench_vs_transformers.py without transformers serve: its stream reading on both servers'
chunk shapes, its load against the tiny model, the table, the verdict, the JSON and the plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import RunningServer
from tools import bench_comparison as comparison
from tools import bench_vs_transformers as bench
from tools.chat_load import THIS_SERVER, TRANSFORMERS_SERVE, Phase, RequestResult, StreamReading, run_phase

# As transformers serve 5.24 streams them: a role chunk, content chunks, usage on the last chunk
# (whatever stream_options says), and no `data: [DONE]`.
THEIR_STREAM = [
    'data: {"id":"x","choices":[{"delta":{"role":"assistant"},"index":0}],"object":"chat.completion.chunk"}',
    "",
    'data: {"id":"x","choices":[{"delta":{"content":"The"},"index":0}],"object":"chat.completion.chunk"}',
    "",
    'data: {"id":"x","choices":[{"delta":{"content":" sea"},"index":0}],"object":"chat.completion.chunk"}',
    "",
    'data: {"id":"x","choices":[{"delta":{},"index":0,"finish_reason":"length"}],'
    '"usage":{"completion_tokens":3,"prompt_tokens":38,"total_tokens":41}}',
    "",
]


def read(lines: list[str]) -> StreamReading:
    reading = StreamReading()
    for elapsed, line in enumerate(lines):
        reading.feed(line, float(elapsed))
    return reading


def test_their_stream_counts_tokens_from_usage_and_ends_without_done() -> None:
    reading = read(THEIR_STREAM)
    assert reading.ttft == 2.0, "the first chunk with text, not the role chunk"
    assert reading.tokens() == (3, "usage"), "usage counts the token that decoded to no text"
    assert reading.prompt_tokens == 38 and reading.error is None and not reading.done


def test_without_usage_text_chunks_are_counted_and_done_ends_the_stream() -> None:
    reading = read(
        [
            'data: {"choices":[{"delta":{"role":"assistant","content":""},"index":0}]}',
            ": keep-alive",
            'data: {"choices":[{"delta":{"content":"a"},"index":0}]}',
            'data: {"choices":[{"delta":{"reasoning_content":"b"},"index":0}]}',
            "data: [DONE]",
            'data: {"choices":[{"delta":{"content":"after the end"},"index":0}]}',
        ]
    )
    assert reading.ttft == 2.0 and reading.done
    assert reading.tokens() == (2, "chunks")


def test_an_error_chunk_fails_the_request() -> None:
    assert read(['data: {"error": "CB worker died"}']).error == 'stream error: "CB worker died"'
    assert read(["data: {not json"]).error is not None


def test_the_dialects_ask_for_a_fixed_length() -> None:
    ours = THIS_SERVER.extra
    assert ours["ignore_eos"] is True and ours["cache"] is False
    theirs = TRANSFORMERS_SERVE.extra
    assert json.loads(theirs["generation_config"]) == {"eos_token_id": -1}
    assert not {"ignore_eos", "cache", "min_tokens"} & set(theirs), "transformers serve answers 422 to these"


async def test_load_against_the_tiny_model(tiny_server: RunningServer) -> None:
    with trio.fail_after(60):
        phase = await run_phase(tiny_server.url, THIS_SERVER, concurrency=2, requests=5, max_tokens=4)
        async with tiny_server.client() as client:
            stats = (await client.get("/stats")).json()
    assert phase.concurrency == 2 and len(phase.results) == 5
    assert sorted(r.prompt for r in phase.results) == [0, 1, 2, 3, 4]
    for result in phase.results:
        assert result.ok, result.error
        assert (result.tokens, result.token_source) == (4, "usage")
        assert result.ttft is not None and 0 < result.ttft <= result.e2e
    figures = comparison.phase_figures(phase)
    assert (figures.ok, figures.failed, figures.tokens_min, figures.tokens_max) == (5, 0, 4, 4)
    assert figures.tokens_per_s == pytest.approx(20 / phase.wall)
    served = stats["model_metrics"]["tiny-gpt-oss"]["requests"]
    assert served["cached"] == 0 and served["ok"] == 5, "cache: false: every request was generated"


def synthetic(server: str, concurrency: int, ttft: float, e2e: float, wall: float, failed: int = 0) -> Phase:
    # TTFTs from ttft x 1.0 to ttft x 1.9: the nearest-rank p50 is ttft x 1.4, the p95 ttft x 1.9.
    results = [RequestResult(i, ttft * (1 + i / 10), e2e, 64, "usage", 40, None) for i in range(10)]
    results += [RequestResult(0, None, 0.1, 0, "chunks", None, "HTTP 500: boom")] * failed
    return Phase(server, concurrency, wall, tuple(results))


def comparisons(ours_ttft: float, ours_wall: float, failed: int = 0) -> list[comparison.Comparison]:
    ours = [synthetic(THIS_SERVER.name, 8, ours_ttft, 4.0, ours_wall, failed)]
    theirs = [synthetic(TRANSFORMERS_SERVE.name, 8, 0.5, 8.0, 10.0)]
    return comparison.compare(ours, theirs)


def test_table_shows_both_servers_and_the_ratios() -> None:
    rows = comparisons(ours_ttft=0.25, ours_wall=5.0)
    table = comparison.render_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| 8 | this server | 0.350 | 0.475 | 4.000 | 4.000 | 128.0 | 10 / 0 |")
    assert lines[3].startswith("| 8 | transformers serve | 0.700 | 0.950 | 8.000 | 8.000 | 64.0 | 10 / 0 |")
    assert lines[4] == "| 8 | ours / theirs | 0.50x | 0.50x | 0.50x | 0.50x | 2.00x | |"
    assert "64-64 tokens per reply (counted from usage)" in comparison.token_notes(rows)[0]


def test_the_bar_needs_more_throughput_a_lower_p95_ttft_and_no_failures() -> None:
    assert comparison.verdict(comparisons(ours_ttft=0.25, ours_wall=5.0), 8).passed is True
    slower_start = comparison.verdict(comparisons(ours_ttft=0.6, ours_wall=5.0), 8)
    assert slower_start.passed is False and slower_start.message.endswith("FAIL")
    assert comparison.verdict(comparisons(ours_ttft=0.25, ours_wall=20.0), 8).passed is False
    assert comparison.verdict(comparisons(ours_ttft=0.25, ours_wall=5.0, failed=1), 8).passed is False
    unmeasured = comparison.verdict(comparisons(ours_ttft=0.25, ours_wall=5.0), 16)
    assert unmeasured.passed is None and "not measured" in unmeasured.message


def test_json_and_plot(tmp_path: Path) -> None:
    phases = [
        synthetic(name, level, 0.2, 2.0, 5.0)
        for name in (THIS_SERVER.name, TRANSFORMERS_SERVE.name)
        for level in (1, 8)
    ]
    rows = comparison.compare(phases[:2], phases[2:])
    record = comparison.to_json({"tokens_per_request": 64}, phases, rows, comparison.verdict(rows, 8))
    assert [c["concurrency"] for c in json.loads(json.dumps(record))["comparisons"]] == [1, 8]
    assert len(record["requests"]) == 40 and record["verdict"]["passed"] is False
    path = tmp_path / "plots" / "latency.png"
    comparison.plot(phases, path, "synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_options() -> None:
    assert bench.parse_levels("1,8") == (1, 8)
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_levels("0,8")
    assert [bench.requests_for(level, None) for level in (1, 8)] == [8, 64]
    assert bench.requests_for(8, 5) == 5
    command = bench.transformers_serve_command("/models/m", 1234, "float32", "cpu", ["--cb-num-blocks", "64"])
    assert command[2:5] == ["transformers.cli.transformers", "serve", "/models/m"]
    assert "--continuous-batching" in command and command[-2:] == ["--cb-num-blocks", "64"]


async def test_main_against_running_servers(tiny_server: RunningServer, tmp_path: Path) -> None:
    """The whole tool, with this server standing in for both sides (no transformers serve here)."""
    argv = [
        *("--ours-url", tiny_server.url, "--theirs-url", tiny_server.url, "--model", "tiny-gpt-oss"),
        *("--concurrency", "1,2", "--requests", "2", "--tokens", "3", "--bar-concurrency", "2"),
        *("--json", str(tmp_path / "figures.json"), "--plot", str(tmp_path / "plot.png")),
    ]
    with trio.fail_after(60):
        code = await trio.to_thread.run_sync(bench.main, argv)
    record = json.loads((tmp_path / "figures.json").read_text())
    assert code == (0 if record["verdict"]["passed"] else 1)
    assert [c["concurrency"] for c in record["comparisons"]] == [1, 2]
    assert {r["server"] for r in record["requests"]} == {THIS_SERVER.name, TRANSFORMERS_SERVE.name}
    assert all(r["error"] is None for r in record["requests"])
    assert {r["tokens"] for r in record["requests"] if r["server"] == THIS_SERVER.name} == {3}
    assert (tmp_path / "plot.png").stat().st_size > 0
    async with httpx.AsyncClient(base_url=tiny_server.url) as client:
        assert (await client.get("/health")).status_code == 200, "a server given by URL is left running"

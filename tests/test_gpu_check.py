"""tools/gpu_check.py end to end on the CPU (--cpu-smoke): everything but the CUDA-only parts."""

from __future__ import annotations

import json
from pathlib import Path

from tools import gpu_check


def test_gpu_check_smoke_run_fills_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    assert gpu_check.main(["--cpu-smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
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
    assert report["info"]["server"]["decode_path"] == "static"
    assert report["phases"]["graphs_vs_eager"]["graphs_equal_eager"] is True
    assert report["phases"]["server_ttft"]["complete"] is True
    served = report["info"]["server_stats"]["requests"]
    assert served["cached"] == 0 and served["ok"] == 1 + 2 + 3 + 4 + 4, "every stream was generated, none replayed"
    measures = [row["measure"] for row in report["rows"]]
    assert measures[0] == "decode tok/s, 1 stream" and measures[-1].startswith("p95 TTFT")
    assert report["total_s"] < 120


def test_the_20b_shape() -> None:
    config = gpu_check.model_config(gpu_check.gpu_plan())
    assert (config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok) == (24, 32, 4)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (2880, 64, 8)
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"] and len(config.layer_types) == 24

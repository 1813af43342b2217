"""``python -m app`` as a user runs it: in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from app.cli import build_parser, config_from_args
from app.config import ConfigError
from tests.conftest import app_process

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )


def test_help_explains_every_option() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--model", "--profile", "--port", "--host", "--dtype", "--device", "--max-batch-size", "--log-level"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("no-such-model", "unknown model 'no-such-model'"),
        ("/tmp/definitely/not/here", "unknown model"),
        (str(ROOT), "holds no config.json"),
    ],
)
def test_a_bad_model_fails_start_up_with_one_clear_line(model: str, words: str) -> None:
    result = run_cli("--model", model, "--port", "0")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and words in lines[0]
    assert "Traceback" not in result.stderr


def test_a_hub_model_that_cannot_load_offline_exits_non_zero() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "app", "--model", "nobody/no-such-model-here", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "nobody/no-such-model-here" in errors[0]
    assert "Traceback" not in result.stderr


def test_bad_numbers_are_refused() -> None:
    result = run_cli("--model", "tiny-gpt-oss", "--max-batch-size", "0")
    assert result.returncode == 2
    assert "max_batch_size must be a positive integer" in result.stderr


def test_parser_defaults_match_the_seed_command() -> None:
    args = build_parser().parse_args(["--model", "20b", "--profile", "latency_first", "--port", "8000"])
    assert (args.model, args.profile, args.port) == ("20b", "latency_first", 8000)
    assert config_from_args(args).cuda_graphs is False, "the static path stays off until measured on a GPU"


def test_cuda_graphs_flag_reaches_the_config() -> None:
    config = config_from_args(build_parser().parse_args(["--cuda-graphs", "--max-seq-len", "2048"]))
    assert config.cuda_graphs is True and config.max_seq_len == 2048
    with pytest.raises(ConfigError, match="max_seq_len"):
        config_from_args(build_parser().parse_args(["--max-seq-len", "1"]))


def test_chat_template_and_tool_call_parser_reach_the_config() -> None:
    template = str(ROOT / "tests" / "data" / "hermes_tools.jinja")
    args = ["--chat-template", template, "--tool-call-parser", "hermes"]
    config = config_from_args(build_parser().parse_args(args))
    assert config.chat_template == template and config.tool_call_parser == "hermes"
    assert config_from_args(build_parser().parse_args([])).tool_call_parser == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tool-call-parser", "mistral"])


def test_redis_flags_reach_the_config_and_a_bad_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPTOSS_REDIS_URL", raising=False)
    assert config_from_args(build_parser().parse_args([])).redis_url is None, "embedded stores by default"
    args = ["--redis-url", "redis://127.0.0.1:6390/2", "--redis-cache-ttl", "60", "--redis-timeout", "0.25"]
    config = config_from_args(build_parser().parse_args(args))
    assert (config.redis_url, config.redis_cache_ttl, config.redis_timeout) == ("redis://127.0.0.1:6390/2", 60, 0.25)
    monkeypatch.setenv("GPTOSS_REDIS_URL", "rediss://user:secret@cache:6380/0")  # kept out of `ps`
    assert config_from_args(build_parser().parse_args([])).redis_url == "rediss://user:secret@cache:6380/0"
    for bad in (
        ["--redis-url", "http://cache:6379"],
        ["--redis-url", "redis://cache:port"],
        ["--redis-cache-ttl", "0"],
        ["--redis-timeout", "-1"],
    ):
        with pytest.raises(ConfigError, match="redis"):
            config_from_args(build_parser().parse_args(bad))


def test_api_key_flag_and_environment_read_a_comma_list_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTOSS_API_KEY", "key-one-001,key-two-002")
    from_env = config_from_args(build_parser().parse_args([])).api_keys
    from_flag = config_from_args(build_parser().parse_args(["--api-key", "key-one-001,key-two-002"])).api_keys
    assert from_flag == from_env == ("key-one-001", "key-two-002")
    repeated = ["--api-key", "key-one-001", "--api-key", "key-two-002, key-three-03"]
    assert config_from_args(build_parser().parse_args(repeated)).api_keys == (*from_env, "key-three-03")


def test_tenant_and_default_flags_reach_the_config(tmp_path: Path) -> None:
    defaults = config_from_args(build_parser().parse_args([]))
    assert (defaults.max_streams_per_key, defaults.max_tokens_default, defaults.generation_config) == (64, None, "auto")
    args = ["--max-streams-per-key", "3", "--max-tokens-default", "0", "--generation-config", "vllm"]
    config = config_from_args(build_parser().parse_args(args))
    assert (config.max_streams_per_key, config.max_tokens_default, config.generation_config) == (3, 0, "vllm")
    for bad in (["--max-streams-per-key", "0"], ["--max-tokens-default", "-1"]):
        with pytest.raises(ConfigError):
            config_from_args(build_parser().parse_args(bad))
    result = run_cli("--model", "tiny-gpt-oss", "--generation-config", str(tmp_path), "--port", "0")
    assert result.returncode == 2 and "no generation_config.json there" in result.stderr


def test_a_missing_chat_template_is_refused_at_once() -> None:
    result = run_cli("--model", "tiny-gpt-oss", "--chat-template", "/tmp/no/such/template.jinja", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --chat-template /tmp/no/such/template.jinja: no such file"


async def test_serves_then_exits_zero_on_sigterm() -> None:
    async with app_process("--model", "tiny-gpt-oss") as (process, url):
        with trio.fail_after(120):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                while (await client.get("/health")).json()["status"] != "ok":
                    await trio.sleep(0.1)
                response = await client.post("/generate", json={"prompt": "hi", "max_tokens": 3, "stream": False})
                assert response.status_code == 200
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0

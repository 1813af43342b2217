"""OpenAI's Codex CLI, unmodified and with its default features, against a live tiny gpt-oss.

``make codex-deps`` (``make test`` runs it) installs the pinned npm package into .codex-cli/; the
test skips without it, except in CI, where it fails. Codex's first request carries its function
tools, its ``multi_agent_v1`` namespace tool and a hosted ``web_search`` tool, ``store: false``
and ``include: ["reasoning.encrypted_content"]``.

The random model never calls a tool by itself, so its output is scripted (tests/scripted_harmony.py)
across Codex's two requests: an analysis, then a call to ``exec_command``; then, once Codex has run
the command in its read-only sandbox and sent the output back, a final answer that ends the run.
The script names one token per forward pass, so the server prefills each prompt in one pass
(``prefill_chunk_tokens`` above Codex's prompt of about 7,000 tokens).

Codex 0.169's Linux sandbox is its bundled bubblewrap (``codex-resources/bwrap`` in the package,
used when none is on PATH) with a seccomp filter; it needs user namespaces, which root has here.
The command's attempt to write a file fails with "Read-only file system": the sandbox held.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from app.config import PROFILES
from app.engine.loader import ModelWeights
from tests.conftest import ROOT, server_config
from tests.scripted_harmony import scripted_server

CODEX = ROOT / ".codex-cli" / "node_modules" / ".bin" / "codex"
MODEL = "tiny-gpt-oss"
COMMAND = "echo codex-was-here; touch probe"
ANSWER = "The command ran in the sandbox."
SCRIPT = (
    "<|channel|>analysis<|message|>I will run the command.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.exec_command <|constrain|>json<|message|>"
    + json.dumps({"cmd": COMMAND})
    + "<|call|>"  # the first response ends here; the second begins
    + f"<|channel|>final<|message|>{ANSWER}<|return|>"
)

pytestmark = pytest.mark.slow


class Recorder:
    """The ASGI app, with each POST /v1/responses body kept as JSON, in order."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/responses":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []

        async def tee() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(chunks)))
            return message

        await self.app(scope, tee, send)


def codex_home(folder: Path, url: str) -> Path:
    folder.mkdir()
    (folder / "config.toml").write_text(
        f'model = "{MODEL}"\nmodel_provider = "local"\n\n'
        f'[model_providers.local]\nname = "local"\nbase_url = "{url}/v1"\nwire_api = "responses"\n'
    )
    return folder


async def test_codex_exec_runs_a_scripted_command_in_its_sandbox_and_answers(
    tiny_weights: ModelWeights, tmp_path: Path
) -> None:
    if not CODEX.exists():
        message = f"{CODEX} is missing: `make codex-deps` installs Codex CLI from npm"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    profile = dataclasses.replace(PROFILES["latency_first"], max_batch_size=2, prefill_chunk_tokens=8192)
    recorder: list[Recorder] = []

    def record(app: Any) -> Recorder:
        recorder.append(Recorder(app))
        return recorder[0]

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    async with scripted_server(tiny_weights, SCRIPT, server_config(profile=profile), record) as server:
        env = {**os.environ, "CODEX_HOME": str(codex_home(tmp_path / "home", server.url))}
        with trio.fail_after(300):
            run = await trio.run_process(
                [str(CODEX), "exec", "--skip-git-repo-check", "Run the command."],
                cwd=workspace,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    printed, log = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 0, f"codex exited {run.returncode}\n{log}\n{printed}"
    assert ANSWER in printed, f"{printed}\n{log}"
    first, second = recorder[0].bodies  # the call, then the answer: no request beyond
    kinds = {tool["type"] for tool in first["tools"]}
    assert {"function", "namespace", "web_search"} <= kinds and first["store"] is False
    # The call came back as Codex sent it on, and with it the command's output from the sandbox.
    [call] = [item for item in second["input"] if item["type"] == "function_call"]
    assert call["name"] == "exec_command" and json.loads(call["arguments"]) == {"cmd": COMMAND}
    [output] = [item for item in second["input"] if item["type"] == "function_call_output"]
    assert output["call_id"] == call["call_id"]
    assert "codex-was-here" in output["output"] and "Read-only file system" in output["output"], output
    assert not (workspace / "probe").exists()
    # The reasoning went out sealed and came back so: the second prompt had it (app.store.reasoning_seal).
    [reasoning] = [item for item in second["input"] if item["type"] == "reasoning"]
    assert reasoning["encrypted_content"]

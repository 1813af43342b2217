"""A wedged or dead pipeline is visible and restartable.

A step thread that hangs turns /health into 503 ``stalled`` (with the step's age) and is logged;
an actor that dies ends every open stream with an error event, turns /health into ``failed``, and
makes ``python -m app`` exit non-zero so a supervisor restarts it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from app.engine.loader import ModelWeights
from tests.conftest import running_server, server_config
from tests.test_observability import json_log

ROOT = Path(__file__).resolve().parent.parent


async def test_a_step_that_hangs_turns_health_stalled_and_is_logged(tiny_weights: ModelWeights) -> None:
    """Breakage caught: /health said "ok" while the step thread was stuck (deadlines froze too)."""
    hang, let_go = threading.Event(), threading.Event()

    async def steps(fn: Callable[[], Any]) -> Any:
        def run() -> Any:
            if hang.is_set():
                let_go.wait(30)
            return fn()

        return await trio.to_thread.run_sync(run)

    log = io.StringIO()
    with json_log(log):
        config = server_config(step_timeout=0.5)
        async with running_server(tiny_weights, config, step_caller=steps) as server, server.client() as client:
            ok = await client.post("/generate", json={"prompt": "fine", "max_tokens": 2, "stream": False})
            healthy = (await client.get("/health")).json()
            hang.set()
            async with trio.open_nursery() as nursery:
                stuck_request = {"prompt": "stuck", "max_tokens": 2, "stream": False}
                nursery.start_soon(functools.partial(client.post, "/generate", json=stuck_request))
                await trio.sleep(1.5)
                stuck = await client.get("/health")
                let_go.set()
            recovered = (await client.get("/health")).json()
    assert ok.status_code == 200 and healthy["status"] == "ok" and healthy["last_step_age_s"] >= 0
    assert stuck.status_code == 503 and stuck.json()["status"] == "stalled", stuck.json()
    assert stuck.json()["step_running_s"] > 0.5
    assert recovered["status"] == "ok"  # a trip may be under way (the last rows being freed): not stuck
    events = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    assert [e["event"] for e in events].count("step_stalled") == 1, "logged once for the stuck step"


def broken_after_first_step(loaded: Any) -> Any:
    """The runner's second decode returns a result the scheduler cannot read (its rows a list):
    the scheduler actor itself raises, outside the step (a step that raises fails its requests)."""
    runner = loaded.runner
    real_step = runner.step
    decodes = {"n": 0}

    def step(plan: Any, must_continue: Any = ()) -> Any:
        result = real_step(plan, must_continue)
        decodes["n"] += plan.kind == "decode"
        return result if decodes["n"] < 2 else dataclasses.replace(result, rows=list(result.rows.items()))

    runner.step = step
    return loaded


async def test_a_dead_pipeline_fails_the_open_streams_and_says_so(tiny_weights: ModelWeights) -> None:
    """Breakage caught: the pipeline died while Hypercorn went on answering 500s with /health 200."""
    fatal: list[str] = []
    async with (
        running_server(tiny_weights, runner_hook=broken_after_first_step, on_fatal=fatal.append) as server,
        server.client() as client,
    ):
        response = await client.post("/generate", json={"prompt": "x", "max_tokens": 50})
        health = await client.get("/health")
        after = await client.post("/generate", json={"prompt": "y", "max_tokens": 2, "stream": False})
    events = [block for block in response.text.strip().split("\n\n") if block]
    assert events[0].startswith("event: start") and events[-1].startswith("event: error"), events[-2:]
    assert '"code":"stream_lost"' in events[-1]
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert after.status_code == 503
    assert fatal and "cannot serve" in fatal[0]


def test_python_m_app_exits_non_zero_when_its_pipeline_dies(tmp_path: Path) -> None:
    """The same fault in ``python -m app`` (the scheduler patched to raise on its second step):
    the open stream gets its error event, then the process exits with status 1."""
    script = tmp_path / "serve_broken.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from actors import scheduler
            from app import cli

            deliver = scheduler.GpuScheduler._deliver
            calls = {"n": 0}

            def broken(self, plan, result):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("an actor's own bug")
                return deliver(self, plan, result)

            scheduler.GpuScheduler._deliver = broken
            sys.exit(cli.main(sys.argv[1:]))
            """
        )
    )
    process = subprocess.Popen(
        # The suite's prefix pool (64 MiB): a 1 GiB zero-fill is not what this tests.
        [
            *(sys.executable, str(script), "--model", "tiny-gpt-oss", "--port", "0"),
            *("--prefix-cache-mb", "64", "--log-format", "json"),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        url = None
        for line in process.stderr:
            if '"listening"' in line:
                url = json.loads(line)["urls"][0]
                break
        assert url, "the server did not start"
        with httpx.Client(base_url=url, timeout=60) as client:
            while client.get("/health").json()["status"] != "ok":
                pass
            response = client.post("/generate", json={"prompt": "x", "max_tokens": 50})
        code = process.wait(timeout=180)  # a loaded 2-core CI box: start-up and drain
        rest = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
    assert response.text.rstrip().split("\n\n")[-1].startswith("event: error"), response.text[-300:]
    assert code == 1
    assert "pipeline_failed" in rest and "error: an actor of the pipeline failed" in rest

"""deploy/: the Kubernetes manifests hang together (labels, ports, probes, the server's own flags)
and the systemd unit's command serves, as written, on the tiny gpt-oss."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from actors.gateway_series import KV_USAGE, RUNNING, WAITING
from app.cli import build_parser, config_from_args
from app.config import ServerConfig, every_setting
from app.models.local_builds import cache_root
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if doc]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [
        doc
        for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for doc in documents(path.name)
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(found) == 1, (kind, name)
    return found[0]


def server_container() -> dict[str, Any]:
    pod = one("Deployment", "gptoss-server")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


def test_every_manifest_is_a_named_kubernetes_object() -> None:
    paths = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    assert {path.name for path in paths} >= {"deployment.yaml", "service.yaml", "inferencepool.yaml", "redis.yaml"}
    for path in paths:
        for doc in documents(path.name):
            assert doc["apiVersion"] and doc["kind"] and re.fullmatch(r"[a-z0-9-]+", doc["metadata"]["name"]), path


def test_the_deployment_runs_flags_this_server_accepts() -> None:
    container = server_container()
    assert container["command"] == ["python", "-m", "app"]
    config = config_from_args(build_parser().parse_args(container["args"]))
    assert config.host == "0.0.0.0" and config.model == "20b"
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": config.port}
    grace = one("Deployment", "gptoss-server")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.drain_timeout, "the pod is killed before its streams drain"


def test_probes_ask_health_on_the_served_port() -> None:
    container = server_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a 20b load takes minutes"
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > container["readinessProbe"]["periodSeconds"]


def test_service_pool_and_route_select_the_server_pods() -> None:
    labels = one("Deployment", "gptoss-server")["spec"]["template"]["metadata"]["labels"]
    port = server_container()["ports"][0]
    service = one("Service", "gptoss-server")["spec"]
    assert service["selector"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] == port["name"]
    pool = one("InferencePool", "gptoss-pool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": port["containerPort"]}]
    route = one("HTTPRoute", "gptoss-route")["spec"]["rules"][0]["backendRefs"][0]
    assert (route["kind"], route["name"]) == ("InferencePool", "gptoss-pool")
    # The names the pool's endpoint picker reads are the ones /metrics exports.
    text = (DEPLOY / "kubernetes" / "inferencepool.yaml").read_text()
    assert all(name in text for name in (WAITING, RUNNING, KV_USAGE))


def test_the_redis_url_names_the_redis_service_and_redis_evicts() -> None:
    config = config_from_args(build_parser().parse_args(server_container()["args"]))
    assert config.redis_url is not None
    url = httpx.URL(config.redis_url)
    service = one("Service", "gptoss-redis")["spec"]
    assert (url.host, url.port) == ("gptoss-redis", service["ports"][0]["port"])
    (redis,) = one("Deployment", "gptoss-redis")["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1].endswith("-lru"), "bounded by Redis' own eviction"
    assert one("Deployment", "gptoss-redis")["spec"]["template"]["metadata"]["labels"].items() >= (
        service["selector"].items()
    )


def unit() -> dict[str, list[str]]:
    """The unit's [Service] settings, each key with all its values in order (systemd repeats keys)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in (DEPLOY / "systemd" / "gptoss-server.service").read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def variables_the_server_reads() -> set[str]:
    declared = {declaration.env for _, declaration in every_setting(ServerConfig) if declaration.env}
    return declared | set(re.findall(r"GPTOSS_[A-Z_]+", (ROOT / "app/models/local_builds.py").read_text()))


def test_the_unit_sets_only_variables_the_server_reads() -> None:
    environment = dict(entry.split("=", 1) for entry in unit()["Environment"])
    ours = {name for name in environment if name.startswith("GPTOSS_")}
    assert ours and ours <= variables_the_server_reads(), ours - variables_the_server_reads()


def test_the_dockerfile_copies_what_the_package_needs() -> None:
    copied = re.findall(r"^COPY (.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    for line in copied:
        for path in line.split():
            assert (ROOT / path).exists(), path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
async def test_the_units_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """ExecStart as written (the venv's hypercorn, hypercorn.toml, app.asgi:app), on loopback and
    the tiny gpt-oss: /health turns 200, /metrics has the gateway's series, SIGTERM exits 0."""
    settings = unit()
    command = shlex.split(settings["ExecStart"][0])
    assert command[0].endswith("/.venv/bin/hypercorn")
    port = free_port()
    bind = command.index("--bind")
    command[bind + 1] = f"127.0.0.1:{port}"
    command[0] = str(Path(sys.executable).with_name("hypercorn"))
    (tmp_path / "tiny-gpt-oss-v1").symlink_to(cache_root() / "tiny-gpt-oss-v1")  # built by the fixtures
    environment = {**os.environ, **dict(entry.split("=", 1) for entry in settings["Environment"])}
    environment.update(GPTOSS_MODEL="tiny-gpt-oss", GPTOSS_CACHE_DIR=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    environment.update(GPTOSS_LOG_LEVEL="warning")
    process = await trio.lowlevel.open_process(command, cwd=ROOT, env=environment, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            with trio.fail_after(120):
                while True:
                    try:
                        if (await client.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.2)
            body = {"prompt": "hi", "max_tokens": 3, "stream": False}
            assert (await client.post("/generate", json=body)).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert f'{WAITING}{{model_name="tiny-gpt-oss"}} 0.0' in metrics
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

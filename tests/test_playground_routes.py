"""GET / and its files over HTTP: content types, caching, and nothing fetched from elsewhere.

What the page does in a browser is tests/test_browser.py's part.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib

import pytest
import trio

from app.engine.loader import ModelWeights
from app.http.playground_routes import CONTENT_TYPES, load_assets
from tests.conftest import running_server
from tools.server_process import ROOT

STATIC = ROOT / "app" / "static"


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/static/playground.js", "text/javascript; charset=utf-8"),
        ("/static/playground.css", "text/css; charset=utf-8"),
    ],
)
async def test_the_page_and_its_files_are_served_with_their_types(
    tiny_weights: ModelWeights, path: str, content_type: str
) -> None:
    with trio.fail_after(60):
        async with running_server(tiny_weights) as server, server.client() as client:
            response = await client.get(path)
            assert response.status_code == 200
            assert response.headers["content-type"] == content_type
            assert response.headers["cache-control"] == "no-cache"  # revalidated on every load
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "default-src 'none'" in response.headers["content-security-policy"]
            etag = response.headers["etag"]

            again = await client.get(path, headers={"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b""
            assert again.headers["etag"] == etag

            head = await client.head(path)
            assert head.status_code == 200 and head.headers["content-type"] == content_type


async def test_an_unknown_file_is_a_json_404(tiny_weights: ModelWeights) -> None:
    with trio.fail_after(60):
        async with running_server(tiny_weights) as server, server.client() as client:
            for path in ("/static/nope.js", "/static/../server.py", "/static/%2e%2e/server.py", "/index.html"):
                response = await client.get(path)
                assert response.status_code == 404, path
                assert response.json()["error"]["message"] == "no such endpoint"


def test_the_page_loads_only_files_of_its_own() -> None:
    """No CDN, no web font, no absolute URL: every reference is one of the package's files."""
    assets = load_assets()
    page = assets["index.html"].body.decode()
    references = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert references, "the page links its script and style"
    for reference in references:
        assert reference == "data:," or reference.removeprefix("static/") in assets, reference
    for name, asset in assets.items():
        text = asset.body.decode()
        assert not re.search(r"\b(?:https?:)?//[\w.-]+\.\w", text), f"{name} names another host"
        assert "@import" not in text and "url(" not in text, name


def test_the_static_files_ship_in_the_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["app"]
    for path in STATIC.iterdir():
        assert path.suffix in CONTENT_TYPES, f"{path.name}: a kind of file the playground does not serve"
        assert any(fnmatch.fnmatch(f"static/{path.name}", pattern) for pattern in patterns), path.name

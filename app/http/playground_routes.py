"""GET /: the browser playground, and the files it loads, from the package's ``static`` folder.

The files are read once, at start-up, into memory: a handful of small files, served with explicit
content types (not the platform's mimetypes table, which differs between systems), ``no-cache``
plus an ETag (a browser revalidates every load and so never runs an old script against a newer
server, yet transfers nothing when the file is unchanged), and a Content-Security-Policy that lets
the page load and fetch from this server only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files

from quart import Response, abort, request
from quart_trio import QuartTrio

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Nothing but this server: no CDN, no inline script, no form posted elsewhere, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE = "index.html"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Every file of ``app/static`` whose kind we serve, by name."""
    assets = {}
    for item in files("app").joinpath("static").iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in CONTENT_TYPES:
            body = item.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            assets[item.name] = Asset(body, CONTENT_TYPES[suffix], etag)
    if PAGE not in assets:
        raise RuntimeError(f"the playground page app/static/{PAGE} is missing from the package")
    return assets


def asset_response(asset: Asset) -> Response:
    headers = {
        "ETag": asset.etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    }
    if asset.etag in request.headers.get("If-None-Match", ""):
        return Response(b"", status=304, headers=headers)
    return Response(asset.body, content_type=asset.content_type, headers=headers)


def register(app: QuartTrio) -> None:
    assets = load_assets()

    async def page() -> Response:
        return asset_response(assets[PAGE])

    async def static_file(filename: str) -> Response:
        asset = assets.get(filename)
        if asset is None:
            abort(404)
        return asset_response(asset)

    app.add_url_rule("/", "playground", page, methods=["GET"])
    # Quart already routes /static/<path:filename> to this same folder (the app's static folder),
    # with the platform's content types and no Cache-Control; the playground's handler takes it over.
    if "static" in app.view_functions:
        app.view_functions["static"] = static_file
    else:
        app.add_url_rule("/static/<path:filename>", "static", static_file, methods=["GET"])

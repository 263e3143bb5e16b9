"""The web console's files as the API serves them (no browser: tests/e2e/test_console.py drives one): the page and
its assets with the security headers, no inline script, nothing from another origin, the vendored chart library as
recorded, and the API's own answers unchanged around them."""

from __future__ import annotations

import hashlib
import re

import httpx
import pytest

from app.console import STATIC_DIR
from tests.app.conftest import Backend

SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the files do not touch the database

MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".md": "text/markdown"}


def assert_console_headers(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    policy = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert policy["default-src"] == "'self'" and policy["script-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'"
    assert "unsafe" not in csp  # no inline script or style, no eval
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"


@SQLITE_ONLY
def test_the_page_and_every_asset_are_served_with_the_headers(backend: Backend) -> None:
    page = httpx.get(backend.base_url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert_console_headers(page)
    scripts = re.findall(r"<script\b[^>]*>", page.text)
    assert scripts and all('src="/console/' in s for s in scripts)  # no inline script
    assert "<style" not in page.text and " style=" not in page.text
    for path in sorted(p for p in STATIC_DIR.rglob("*") if p.is_file()):
        response = httpx.get(f"{backend.base_url}/console/{path.relative_to(STATIC_DIR).as_posix()}")
        assert response.status_code == 200, path
        assert response.content == path.read_bytes()
        media_type = MEDIA_TYPES.get(path.suffix)
        if media_type:  # a module script needs a JavaScript type (nosniff)
            assert response.headers["content-type"].startswith(media_type), (path, response.headers["content-type"])
        assert_console_headers(response)


@SQLITE_ONLY
def test_other_paths_keep_the_apis_answers(backend: Backend) -> None:
    for path in ("/console/missing.js", "/console/../app/main.py", "/console/%2e%2e/__init__.py", "/index.html",
                 "/nothing"):
        response = httpx.get(backend.base_url + path)
        assert response.status_code == 404, path
        assert "error" in response.json(), path
    assert httpx.post(backend.base_url + "/", json={}).status_code == 405
    assert httpx.get(backend.base_url + "/v1/models").status_code == 401  # the key gate, as before
    paths = httpx.get(backend.base_url + "/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/console")]  # not part of the API's contract


def test_the_console_loads_nothing_from_elsewhere() -> None:
    """Its own modules import by relative path and name no other origin (the key never leaves for third-party
    code); the page links only this server's files."""
    ours = list((STATIC_DIR / "js").rglob("*.js"))
    assert ours
    for path in ours:
        text = path.read_text()
        assert not re.search(r"\bhttps?://|//[a-z0-9.-]+\.[a-z]{2,}/", text), path
        for spec in re.findall(r'^import .*? from "([^"]+)";', text, flags=re.M):
            assert spec.startswith("./") or spec.startswith("../"), (path, spec)
        assert "localStorage" not in text and "document.cookie" not in text, path  # the key: sessionStorage only
    html = (STATIC_DIR / "index.html").read_text()
    assert all(ref.startswith(("/console/", "data:", "#")) for ref in re.findall(r'(?:src|href)="([^"]+)"', html))


def test_the_vendored_chart_library_is_the_recorded_one() -> None:
    vendor = STATIC_DIR / "vendor" / "uplot"
    recorded = dict(re.findall(r"\| `([^`]+)` \| .*?sha256 `([0-9a-f]{64})`", (vendor / "VENDOR.md").read_text()))
    assert set(recorded) == {"uPlot.esm.js", "uPlot.min.css", "LICENSE"}
    for name, digest in recorded.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name

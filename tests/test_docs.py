"""`/docs` works without internet: every script, style sheet and icon of the page comes from the
node itself (from an installed package), and no other page of LionMQ loads from another host."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from app.main import create_app
from tests.conftest import ROOT, make_settings

WATCHER_STATIC = ROOT / "watcher" / "static"


class Links(HTMLParser):
    """Every URL an HTML page makes the browser load or follow (src, href)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def links(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    return parser.urls


def same_origin(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("", "data") and not parts.netloc


def client(tmp_path: Path, **settings: object) -> httpx.AsyncClient:
    app = create_app(make_settings(tmp_path, **settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://localhost")


async def test_docs_load_nothing_from_another_host(tmp_path: Path) -> None:
    async with client(tmp_path) as c:
        page = await c.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        urls = links(page.text)
        assert urls, "the page links its script and style sheet"
        assert [u for u in urls if not same_origin(u)] == []
        # Nor from a script or a URL written anywhere else in the page.
        assert re.findall(r"(?:https?:)?//[\w.-]+", page.text) == []
        assert "/openapi.json" in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "http" not in csp
        kinds = {"swagger-ui-bundle.js": "javascript", "swagger-ui.css": "text/css"}
        for url in urls:
            asset = await c.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 500, url
            for name, kind in kinds.items():
                if url.endswith(name):
                    assert kind in asset.headers["content-type"], url
        assert {u.rsplit("/", 1)[-1] for u in urls} >= set(kinds)
        assert (await c.get("/openapi.json")).status_code == 200
        # ReDoc would load its fonts from Google: there is one docs page, /docs.
        assert (await c.get("/redoc")).status_code == 404


async def test_docs_and_their_assets_need_no_token_but_nothing_else_opens(
    tmp_path: Path,
) -> None:
    async with client(tmp_path, api_token="s3cret") as c:
        page = await c.get("/docs")
        assert page.status_code == 200
        for url in links(page.text):
            assert (await c.get(url)).status_code == 200, url
        assert (await c.get("/docs/assets/nothing-here.js")).status_code == 404
        assert (await c.get("/channels")).status_code == 401
        assert (await c.get("/docs/assets-x")).status_code == 401


def test_the_watcher_page_loads_nothing_from_another_host() -> None:
    page = (WATCHER_STATIC / "index.html").read_text()
    assert [u for u in links(page) if not same_origin(u)] == []
    for asset in WATCHER_STATIC.iterdir():
        text = asset.read_text()
        # The page's one connection is its own /feed, on the page's own host.
        # A URL starts at a quote or backtick (a regex literal such as /\//g is not one).
        found = re.findall(r"[\"'`](?:https?:|wss?:)?//[\w.${}-]+", text)
        found = [u[1:] for u in found]
        assert found in ([], ["${proto}//${location.host}"]), (asset.name, found)

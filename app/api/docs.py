"""`/docs`: Swagger UI served whole by the node, so it works without internet.

FastAPI's own page loads Swagger UI from a CDN (a blank page offline, and a page of this node
running a third party's script). The assets come from the `fastapi-offline` package instead,
which keeps a current Swagger UI bundle; nothing is copied into this repository.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

# The browser refuses anything from another host, even if a future bundle asked for it.
# Swagger UI starts from an inline script and sets inline styles.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
"""Swagger UI's script, style sheet and icon; open like the page itself (see auth.py)."""


def install(app: FastAPI) -> None:
    """Serve `/docs` and its assets; the app is built with `docs_url=None, redoc_url=None`."""
    assets = files("fastapi_offline") / "static"
    app.mount(ASSETS_URL, StaticFiles(directory=str(assets)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    title = f"{app.title} - API"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=title,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            # No badge that sends the schema to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page

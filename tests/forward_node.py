"""`python -m tests.forward_node`: a node process whose router is fixed by the environment.

Settings as for `python -m app` (HOST, PORT, NODE_ID, STORE_URL, ...); FORWARD_ROUTES is
`channel=url=node_id[,...]`: those channels are forwarded there, every other one is served here.
For measuring a forwarded request against a direct one with real processes, without the runtime.
"""

from __future__ import annotations

import asyncio
import os

import uvicorn

from app.cluster.forward import forward_session, install
from app.cluster.route import Remote
from app.main import create_app
from app.settings import load_settings
from tests.forward_support import FakeRouter


def main() -> None:
    settings = load_settings()
    app = create_app(settings)
    router = FakeRouter(settings.node_id)
    for entry in filter(None, os.environ.get("FORWARD_ROUTES", "").split(",")):
        channel, url, node_id = entry.split("=")
        router.routes[channel] = Remote("s1", url, node_id)

    async def serve() -> None:
        async with forward_session() as client:
            install(app, router, client)
            config = uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level="warning",
                access_log=False,
                proxy_headers=False,  # as `python -m app` runs it
            )
            await uvicorn.Server(config).serve()

    asyncio.run(serve())


if __name__ == "__main__":
    main()

"""Test servers on loopback: an aiohttp application served on 127.0.0.1 at a free port, the
one way every fake and scripted server of the tests starts."""

from __future__ import annotations

from typing import Any

from aiohttp import web


async def serve(app: web.Application, **runner_options: Any) -> tuple[web.AppRunner, str]:
    """Serves `app` on 127.0.0.1 at a port the system picks: its runner (`cleanup()` stops
    it) and its base URL, `http://127.0.0.1:PORT`. `runner_options` go to web.AppRunner
    (access_log=None, shutdown_timeout=...)."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    # TCPSite keeps the listening sockets on its server; port 0 means "any free port".
    sockets = getattr(site._server, "sockets", None)
    assert sockets, "the test server did not bind"
    return runner, f"http://127.0.0.1:{int(sockets[0].getsockname()[1])}"

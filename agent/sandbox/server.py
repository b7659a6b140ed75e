"""What both sandbox servers share: loopback lifecycle, request signing checks, common faults."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from typing import Any

from aiohttp import web

from agent.signing import verify


class SignedSandbox:
    """Base of the sandbox servers. Subclasses add routes in `routes()`."""

    error_rate = 0.0  # 503 before anything is committed
    rate_limit_rate = 0.0  # 429 with Retry-After
    latency = 0.0  # up to this many seconds added to every request

    def __init__(self, api_key: str, secret: str | None, seed: int) -> None:
        self.api_key = api_key
        self.secret = secret or secrets.token_hex(16)
        self.random = random.Random(seed)
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0  # requests being handled at once, at most
        self.auth_failures = 0
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def fault_rates(self) -> tuple[float, float, float]:
        """(error_rate, rate_limit_rate, latency) right now."""
        return self.error_rate, self.rate_limit_rate, self.latency

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1024 * 1024)
        self.routes(app)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # Short shutdown: a sandbox may hold deliberately stalled requests open.
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        # TCPSite keeps the listening sockets on its server; port 0 means "any free port".
        sockets = getattr(site._server, "sockets", None)
        assert sockets, "sandbox server did not bind"
        self.base_url = f"http://{host}:{int(sockets[0].getsockname()[1])}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def error(status: int, code: str, message: str, **headers: str) -> web.Response:
        return web.json_response(
            {"error": {"code": code, "message": message}}, status=status, headers=headers
        )

    def lose_response(self, request: web.Request) -> web.Response:
        """The change is committed, but the client never hears about it."""
        if request.transport is not None:
            request.transport.close()
        return self.error(502, "bad_gateway", "response lost")

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._handle(request, handler)
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.Request, handler: Any) -> web.StreamResponse:
        error_rate, rate_limit_rate, latency = self.fault_rates()
        if latency:
            await asyncio.sleep(self.random.uniform(0, latency))
        body = await request.read()
        if request.headers.get("X-Api-Key") != self.api_key:
            problem: str | None = "unknown api key"
        else:
            problem = verify(
                self.secret,
                request.headers.get("X-Timestamp", ""),
                request.headers.get("X-Signature", ""),
                request.method,
                request.raw_path,
                body,
                time.time(),
            )
        if problem is not None:
            self.auth_failures += 1
            return self.error(401, "unauthorized", problem)
        if self.random.random() < rate_limit_rate:
            return self.error(429, "rate_limited", "slow down", **{"Retry-After": "1"})
        if self.random.random() < error_rate:
            return self.error(503, "unavailable", "try again", **{"Retry-After": "1"})
        return await handler(request)  # type: ignore[no-any-return]

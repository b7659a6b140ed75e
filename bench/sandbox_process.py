"""The sandbox platform in its own process for the benchmark, with admin routes to create
orders in bulk or as a steady stream, and to read back delivery timings. Running it apart keeps
the agent's CPU and memory figures the agent's own."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import time
from multiprocessing.queues import Queue
from typing import Any

from aiohttp import web

from agent.sandbox.platform import SandboxPlatform


class BenchPlatform(SandboxPlatform):
    """Also remembers when each order listing was answered, to split latency into the wait
    for the next poll (set by the poll interval) and what the agent adds after it."""

    def __init__(self, api_key: str, secret: str) -> None:
        super().__init__(api_key=api_key, secret=secret)
        self.listed_at: list[float] = []
        self.delivered_by_prefix: dict[str, int] = {}
        self.counted: set[str] = set()

    async def _list(self, request: web.Request) -> web.Response:
        self.listed_at.append(time.time())
        return await super()._list(request)

    def routes(self, app: web.Application) -> None:
        super().routes(app)
        app.router.add_post("/_admin/orders", self._admin_orders)
        app.router.add_post("/_admin/stream", self._admin_stream)
        app.router.add_get("/_admin/timings", self._admin_timings)
        app.router.add_get("/_admin/progress", self._admin_progress)

    async def _admin_orders(self, request: web.Request) -> web.Response:
        body = await request.json()
        ids = [
            self.add_order(body["sku"], order_id=f"{body['prefix']}{i:07d}")
            for i in range(body["count"])
        ]
        if not body.get("listed", True):
            # For the raw-limit client only: deliverable, but never shown to the agent.
            del self._sequence[-len(ids) :]
        # The order book only grows during a run, and every 25% of growth the collector makes
        # a full pass over all of it: 100-200 ms with the platform frozen, at moments that
        # fall into one measurement and not the other. Bulk-made orders are moved out of its
        # passes, for the raw-limit runs and the agent's burst alike.
        gc.freeze()
        return web.json_response({"created": len(ids)})

    async def _admin_stream(self, request: web.Request) -> web.Response:
        body = await request.json()
        asyncio.get_running_loop().create_task(
            self._stream(body["sku"], body["prefix"], body["rate"], body["count"])
        )
        return web.json_response({"started": True})

    async def _stream(self, sku: str, prefix: str, rate: float, count: int) -> None:
        start = time.monotonic()
        for i in range(count):
            # paced by the clock, not by sleep drift
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.add_order(sku, order_id=f"{prefix}{i:07d}")

    async def _admin_progress(self, request: web.Request) -> web.Response:
        """Cheap enough to ask twice a second without slowing the platform down."""
        return web.json_response({"delivered": self.delivered_count(request.query["prefix"])})

    def delivered_count(self, prefix: str) -> int:
        counts = self.delivered_by_prefix
        return counts.get(prefix, 0)

    async def _deliver(self, request: web.Request) -> web.StreamResponse:
        response = await super()._deliver(request)
        order_id = request.match_info["id"]
        if response.status == 200 and order_id not in self.counted:
            self.counted.add(order_id)
            prefix = order_id.rstrip("0123456789")
            self.delivered_by_prefix[prefix] = self.delivered_by_prefix.get(prefix, 0) + 1
        return response

    async def _admin_timings(self, request: web.Request) -> web.Response:
        prefix = request.query["prefix"]
        rows = [
            [oid, o.visible_at, o.delivered_at]
            for oid, o in self.orders.items()
            if oid.startswith(prefix)
        ]
        return web.json_response({"orders": rows, "listed_at": self.listed_at})


def _serve(api_key: str, secret: str, ready: Queue[Any]) -> None:
    async def main() -> None:
        platform = BenchPlatform(api_key=api_key, secret=secret)
        ready.put(await platform.start())
        await asyncio.Event().wait()

    asyncio.run(main())


def start_platform_process(
    api_key: str, secret: str
) -> tuple[multiprocessing.process.BaseProcess, str]:
    context = multiprocessing.get_context("spawn")
    ready: Queue[Any] = context.Queue()
    process = context.Process(target=_serve, args=(api_key, secret, ready), daemon=True)
    process.start()
    return process, str(ready.get(timeout=30))

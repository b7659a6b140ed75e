"""An optional Prometheus endpoint ([metrics] in the config; pip install 'kami-agent[metrics]').

What the engine counts in memory (deliveries, parked lines, retries, its queue) is read at
scrape time. What the ledger holds (lines per state, backlog, stock per SKU, open alerts,
delivery latencies) is read every `refresh_seconds` by one background task, so however
often Prometheus scrapes, the ledger is asked the same few questions at the same pace.

The latency histogram is fed from the ledger's delivered lines (seen -> delivered), for the
lines delivered since this exporter started: on a ledger shared by several agents each agent
reports every delivery, so sum them with max() rather than sum() in Grafana.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from agent.console.data import DELIVERED_SAMPLE, EngineView, delivery_latency
from agent.console.launch import serve
from agent.console.settings import MetricsSettings
from agent.domain import ACTIVE_STATES, LineState, OrderLine
from agent.logs import get_logger
from agent.store.base import Store

log = get_logger("kami.metrics")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf"))


class EngineCollector(Collector):
    """The running engine's own counters, read when Prometheus scrapes (no ledger call)."""

    def __init__(self, engine: EngineView | None) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        if self.engine is None:
            return
        s: dict[str, Any] = self.engine.snapshot()
        for name, key, text in (
            ("kami_deliveries", "delivered", "Deliveries this agent completed since it started"),
            ("kami_parked", "parked", "Order lines this agent parked for a human since it started"),
            ("kami_retries", "retries", "Delivery retries this agent scheduled since it started"),
        ):
            yield CounterMetricFamily(name, text, value=float(s.get(key, 0)))
        yield GaugeMetricFamily(
            "kami_engine_queue",
            "Order lines queued or in hand in this agent's workers",
            value=float(s.get("backlog", 0)),
        )


class LedgerFigures:
    """Gauges and the latency histogram, refreshed from the ledger."""

    def __init__(self, registry: CollectorRegistry, started: float) -> None:
        self.started = started
        self.lines = Gauge(
            "kami_order_lines", "Order lines in the ledger, by state", ["state"], registry=registry
        )
        self.backlog = Gauge(
            "kami_backlog", "Order lines not yet delivered nor closed", registry=registry
        )
        self.stock = Gauge(
            "kami_stock_keys", "Card keys per SKU and state", ["sku", "state"], registry=registry
        )
        self.alerts = Gauge(
            "kami_alerts_open",
            "Open alerts by kind and severity",
            ["kind", "severity"],
            registry=registry,
        )
        self.latency = Histogram(
            "kami_delivery_latency_seconds",
            "Seconds from an order line entering the ledger to its delivery being recorded",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.refreshed = Gauge(
            "kami_metrics_refreshed_timestamp_seconds",
            "When the ledger figures were last read",
            registry=registry,
        )
        self._observed: set[int] = set()

    async def refresh(self, store: Store) -> None:
        by_state = await store.count_by_state()
        for state in LineState:
            self.lines.labels(state=state.value).set(by_state.get(state, 0))
        self.backlog.set(sum(n for s, n in by_state.items() if s in ACTIVE_STATES))
        self.stock.clear()
        for count in await store.stock_counts():
            for key_state, value in (
                ("free", count.free),
                ("bound", count.bound),
                ("void", count.void),
            ):
                self.stock.labels(sku=count.sku, state=key_state).set(value)
        self.alerts.clear()
        for (kind, severity), n in Counter(
            (a.kind, a.severity) for a in await store.open_alerts()
        ).items():
            self.alerts.labels(kind=kind, severity=severity).set(n)
        self.observe(await store.list_lines(LineState.DELIVERED, DELIVERED_SAMPLE))
        self.refreshed.set(time.time())

    def observe(self, delivered: list[OrderLine]) -> None:
        """Each line delivered since the start goes into the histogram once. Only ids still in
        the window are remembered, so the memory stays bounded."""
        window = set()
        for line in delivered:
            window.add(line.id)
            latency = delivery_latency(line)
            if (
                latency is None
                or line.id in self._observed
                or line.delivered_at is None
                or line.delivered_at < self.started
            ):
                continue
            self.latency.observe(latency)
        self._observed = window


class MetricsExporter:
    def __init__(self, settings: MetricsSettings, store: Store, engine: EngineView | None) -> None:
        self.settings = settings
        self.store = store
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.figures = LedgerFigures(self.registry, time.time())
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def _scrape(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _refresh_loop(self) -> None:
        failing = False
        while True:
            try:
                await self.figures.refresh(self.store)
                failing = False
            except Exception as exc:  # the ledger may be briefly away; say so once
                if not failing:
                    log.warning("metrics_refresh_failed", error=str(exc))
                failing = True
            await asyncio.sleep(self.settings.refresh_seconds)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        self._runner = await serve(app, self.settings.host, self.settings.port, "metrics")
        self._task = asyncio.create_task(self._refresh_loop(), name="metrics-refresh")
        log.info("metrics_listening", host=self.settings.host, port=self.settings.port)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

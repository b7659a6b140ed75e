"""The Prometheus endpoint and the console, started by the daemon's engine when configured:
deliveries, the latency histogram, backlog, stock per SKU and open alerts, scraped over HTTP
on 127.0.0.1 while the real engine delivers from the sandbox platform."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.console.settings import ConsoleSettings, InterfaceSettings, MetricsSettings
from agent.sandbox.platform import SandboxPlatform
from agent.store.sqlite import SQLiteStore
from tests.conftest import make_config, stock
from tests.console_helpers import TOKEN, log_in
from tests.helpers import delivered_all, running_agent, wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics", allow_redirects=False) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(await response.text())


async def test_daemon_serves_metrics_and_console(
    tmp_path: Path,
    sandbox: SandboxPlatform,
    sqlite_store: SQLiteStore,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("KAMI_SECRET_CONSOLE_TOKEN", TOKEN)
    metrics_port, console_port = free_port(), free_port()
    config = dataclasses.replace(
        make_config(tmp_path, sandbox.base_url),
        interfaces=InterfaceSettings(
            console=ConsoleSettings(port=console_port, token_secret="console.token"),
            metrics=MetricsSettings(port=metrics_port, refresh_seconds=0.05),
        ),
    )
    await stock(sqlite_store, "GAME-100", 10)
    orders = [sandbox.add_order("GAME-100") for _ in range(4)]
    async with running_agent(config, sqlite_store, sandbox):
        await wait_for(delivered_all(sandbox, orders), "deliveries")

        async def all_counted() -> bool:
            found = await scrape(metrics_port)
            # One refresh reads the states, then the latencies: both must have seen them.
            return (
                found.get(("kami_delivery_latency_seconds_count", ()), 0) == 4
                and found.get(("kami_order_lines", (("state", "delivered"),))) == 4
            )

        await wait_for(all_counted, "the latency histogram to count the deliveries")
        found = await scrape(metrics_port)
        assert found[("kami_deliveries_total", ())] == 4
        assert found[("kami_stock_keys", (("sku", "GAME-100"), ("state", "free")))] == 6
        assert found[("kami_stock_keys", (("sku", "GAME-100"), ("state", "bound")))] == 4
        assert found[("kami_order_lines", (("state", "delivered"),))] == 4
        assert found[("kami_backlog", ())] == 0
        assert found[("kami_delivery_latency_seconds_bucket", (("le", "+Inf"),))] == 4
        assert ("kami_engine_queue", ()) in found

        # The console is served by the same daemon.
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as client:
            await log_in(client, f"http://127.0.0.1:{console_port}")
    # Stopped with the daemon.
    with pytest.raises(aiohttp.ClientConnectionError):
        await scrape(metrics_port)


async def test_open_alerts_and_backlog_are_exported(tmp_path: Path, sqlite_store: SQLiteStore):
    from agent.domain import AlertCondition
    from agent.metrics import MetricsExporter
    from tests.console_helpers import add_orders

    await add_orders(sqlite_store, ("B-1", "GAME-100", 1), ("B-2", "VIP-30D", 2))
    await sqlite_store.apply_alerts(
        [AlertCondition("low_stock:GAME-100", "low_stock", "warning", "low")], [], 1.0, 3600, 3
    )
    exporter = MetricsExporter(MetricsSettings(port=free_port()), sqlite_store, None)
    await exporter.figures.refresh(sqlite_store)
    found = samples(exporter.render().decode())
    assert found[("kami_backlog", ())] == 2
    assert found[("kami_order_lines", (("state", "new"),))] == 2
    assert found[("kami_alerts_open", (("kind", "low_stock"), ("severity", "warning")))] == 1
    # Lines delivered before the exporter started are not observed as new latencies.
    assert found[("kami_delivery_latency_seconds_count", ())] == 0

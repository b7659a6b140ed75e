"""A platform that does not answer at all (connection refused) for longer than
`alerts.unreachable_after` raises one alert, not one per poll, and it resolves when the
platform answers again (issue 19, alerts that cover outages)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
from aiohttp import web

from agent import logs
from agent.config import NotifySettings
from agent.notify.factory import build_notifier
from agent.platforms.http import HttpPlatform
from agent.runtime import run_engine
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store
from tests.conftest import make_config, platform_settings
from tests.helpers import wait_for


@pytest.fixture
def log_sink(quiet_logs: TextIO) -> Iterator[io.StringIO]:
    """The agent's log lines during the test."""
    sink = io.StringIO()
    logs.configure("debug", sink)
    yield sink
    logs.configure("debug", quiet_logs)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook alert channel's receiver on loopback: the alerts it was sent."""
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(json.loads(await request.read()))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hook", received
    await runner.cleanup()


async def test_unreachable_platform_raises_one_alert_then_its_recovery(
    tmp_path: Path,
    sandbox: SandboxPlatform,
    store: Store,
    receiver: tuple[str, list[dict[str, Any]]],
    log_sink: io.StringIO,
) -> None:
    url, received = receiver
    base_url = sandbox.base_url
    port = int(base_url.rsplit(":", 1)[1])
    await sandbox.stop()  # nobody listens there now: every poll is refused
    config = make_config(tmp_path, base_url)
    alerts = dataclasses.replace(
        config.alerts, forecast_interval=0.05, outbox_interval=0.05, unreachable_after=0.3
    )
    channel = NotifySettings("hook", "webhook", {"url": url, "secret": "s"})
    config = dataclasses.replace(config, alerts=alerts, notify=(channel,))
    notifier = build_notifier(channel, {"s": "hook-secret"}.__getitem__)
    adapter = HttpPlatform(platform_settings(base_url, timeout=0.5), sandbox.secret)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_engine(config, store, {"main": adapter}, stop, None, {"hook": notifier})
    )
    try:
        await wait_for(lambda: len(received) >= 1, "the unreachable alert")
        # Many polls and alert checks later, still the one alert.
        await asyncio.sleep(1.0)
        assert [m["event"] for m in received] == ["opened"]
        assert received[0]["key"] == "unreachable:main"
        assert "main" in received[0]["summary"]
        (still_open,) = await store.open_alerts()
        assert still_open.key == "unreachable:main"
        await sandbox.start(port=port)  # the platform is back
        await wait_for(lambda: len(received) >= 2, "the recovery")
        await asyncio.sleep(0.3)
        assert [(m["key"], m["event"]) for m in received] == [
            ("unreachable:main", "opened"),
            ("unreachable:main", "resolved"),
        ]
        assert await store.open_alerts() == []
    finally:
        stop.set()
        await task
        await adapter.close()
        await notifier.close()
    # The outage's failed polls were warned about once, not at every poll.
    lines = [json.loads(line) for line in log_sink.getvalue().splitlines()]
    failed = [e for e in lines if e["event"] in ("poll_failed", "long_poll_failed")]
    assert len(failed) > 1  # polls went on during the outage, at debug level
    assert [e["level"] for e in failed].count("warning") == 1

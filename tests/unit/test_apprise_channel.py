"""The apprise alert channel (issue 19): the alert reaches a real JSON endpoint on loopback
through apprise's json:// scheme, and the apprise URL (a secret: it holds the services'
tokens) never reaches a log or an error text."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
from aiohttp import web

from agent import logs
from agent.config import ConfigError, NotifySettings, Section
from agent.domain import AlertMessage, Transient
from agent.notify import kind_module
from agent.notify.factory import build_notifier

pytest.importorskip("apprise")

TOKEN = "apprise-token-7f3c9a1e5b2d"  # in the URL's password and path: both secret


@pytest.fixture
def all_logs(quiet_logs: TextIO) -> Iterator[io.StringIO]:
    """Every structlog line and every stdlib log record (apprise's among them) of the test."""
    sink = io.StringIO()
    logs.configure("debug", sink)
    handler = logging.StreamHandler(sink)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield sink
    root.removeHandler(handler)
    root.setLevel(old_level)
    logs.configure("debug", quiet_logs)


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[int, list[dict[str, Any]], list[int]]]:
    """A JSON endpoint: the bodies it received; the status it answers is settable."""
    received: list[dict[str, Any]] = []
    status = [200]

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({}, status=status[0])

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    runner = web.AppRunner(app, access_log=None)  # the test's receiver, not the agent
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port, received, status
    await runner.cleanup()


def message() -> AlertMessage:
    return AlertMessage(
        "low_stock:GAME-100", "low_stock", "opened", "warning", "GAME-100 runs out soon", 1.0e9
    )


async def test_apprise_alert_arrives_and_its_url_stays_secret(
    endpoint: tuple[int, list[dict[str, Any]], list[int]], all_logs: io.StringIO
) -> None:
    port, received, status = endpoint
    url = f"json://kami:{TOKEN}@127.0.0.1:{port}/push/{TOKEN}"
    channel = NotifySettings("push", "apprise", {"urls": "push.urls"})
    notifier = build_notifier(channel, {"push.urls": url}.__getitem__, timeout=5.0)
    await notifier.send(message())
    (body,) = received
    assert "GAME-100 runs out soon" in body["message"]
    status[0] = 500  # the service fails: a retryable error naming no URL
    with pytest.raises(Transient) as failed:
        await notifier.send(message())
    await notifier.close()
    text = all_logs.getvalue() + str(failed.value)
    assert TOKEN not in text and f"127.0.0.1:{port}/push" not in text


def test_apprise_not_installed_is_one_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "apprise", None)  # import apprise raises ImportError
    section = Section(Path("kami.toml"), "notify.push", {"kind": "apprise", "urls": "push.urls"})
    with pytest.raises(ConfigError, match=r"pip install 'kami-agent\[apprise\]'"):
        kind_module("apprise").parse_options(section)

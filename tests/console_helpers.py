"""A console served on 127.0.0.1 over a real ledger, for the console's tests (plain HTTP client
and the browser)."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, ClientSession, web
from aiohttp.test_utils import TestClient, TestServer

from agent.config import Config
from agent.console.app import Console, build_app
from agent.console.settings import ConsoleSettings
from agent.domain import PlatformOrder
from agent.store.base import Store
from tests.conftest import make_config

TOKEN = "console-login-token-for-tests"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


class FakeEngine:
    """What the console reads from a running engine: balances, counters, dispatch."""

    def __init__(self) -> None:
        self.balances: dict[str, Any] = {}
        self.dispatched: list[int] = []

    def snapshot(self) -> dict[str, Any]:
        return {"delivered": 3, "parked": 1, "retries": 2, "backlog": 0}

    def dispatch(self, line_ids: Sequence[int]) -> None:
        self.dispatched.extend(line_ids)


def console_config(tmp_path: Path, base_url: str = "http://127.0.0.1:9") -> Config:
    """The tests' config, its platform `main` at base_url (by default, nothing listens)."""
    return make_config(tmp_path, base_url)


def console_settings(**overrides: Any) -> ConsoleSettings:
    return replace(
        ConsoleSettings(token_secret="console.token", language="en", port=0), **overrides
    )


@asynccontextmanager
async def console_client(
    tmp_path: Path,
    store: Store,
    engine: Any | None = None,
    platform_url: str = "http://127.0.0.1:9",
    **overrides: Any,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    settings = console_settings(**overrides)
    console = Console(console_config(tmp_path, platform_url), settings, store, engine, TOKEN)
    client = TestClient(TestServer(build_app(console), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def csrf_of(html: str) -> str:
    found = CSRF_RE.search(html)
    assert found, "no CSRF token on the page"
    return found.group(1)


async def log_in(
    client: TestClient[web.Request, web.Application] | ClientSession, base: str = ""
) -> str:
    """Logs in with the token; returns the CSRF token of the logged-in session."""
    page = await client.get(f"{base}/login", allow_redirects=False)
    csrf = csrf_of(await page.text())
    done = await client.post(
        f"{base}/login", data={"csrf": csrf, "secret": TOKEN}, allow_redirects=False
    )
    assert done.status == 303 and done.headers["Location"] == "/", done.status
    home = await client.get(f"{base}/", allow_redirects=False)
    assert home.status == 200
    return csrf_of(await home.text())


async def text(response: ClientResponse) -> str:
    return await response.text()


async def add_orders(store: Store, *orders: tuple[str, str, int]) -> list[int]:
    """(order id, sku, quantity) taken in as paid orders; returns the new line ids."""
    return await store.ingest(
        "main",
        [PlatformOrder(order_id=o, status="paid", sku=s, quantity=q) for o, s, q in orders],
        time.time(),
    )

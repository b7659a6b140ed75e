"""No client of ours follows a redirect (issue 13, item 1).

A redirect would carry the request to wherever the other side points: the card keys in a
delivery body, X-Api-Key, the signature, the Idempotency-Key, an alert and its signature. Each
test puts a real server on loopback that answers with a 3xx pointing at ANOTHER loopback
server, and checks that the other server hears nothing and that the answer is an error naming
where it pointed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.config import NotifySettings, SkuSettings, SupplierSettings
from agent.domain import AlertMessage, Ambiguous, CardItem, LineState, Permanent
from agent.notify.factory import build_notifier
from agent.platforms.http import HttpPlatform
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store
from agent.suppliers.fulu import FuluSupplier
from agent.suppliers.http import HttpSupplier
from tests.conftest import make_config, platform_settings, stock
from tests.helpers import line_state_is, running_agent, wait_for
from tests.loopback import serve

CARD = CardItem(code="C-1", secret="CARD-KEY-NEVER-ELSEWHERE")
TG_TOKEN = "123456789:TG-token-in-the-path-AAAAAAAAAAAAAAAA"


@dataclass
class Server:
    url: str
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)


async def _serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return await serve(app, access_log=None)


def _looks_successful(request: web.Request, body: bytes) -> dict[str, Any]:
    """What the other host answers: success in every protocol we speak, so that following
    the redirect would be taken for a delivery, a purchase, a sent alert."""
    try:
        sent = json.loads(body) if body else {}
    except ValueError:
        sent = {}
    ref = sent.get("merchant_ref") if isinstance(sent, dict) else None
    return {
        "status": "completed" if "purchases" in request.path else "delivered",
        "orders": [],
        "next_cursor": None,
        "has_more": False,
        "purchase_id": "FOREIGN-1",
        "merchant_ref": ref or request.query.get("merchant_ref", "x"),
        "items": [{"code": "", "secret": "KEY-CHOSEN-BY-THE-OTHER-HOST"}],
        "ok": True,
        "errcode": 0,
        "code": 0,
    }


@pytest.fixture
async def other() -> AsyncIterator[Server]:
    """The host a redirect points to: records everything that reaches it."""
    server = Server("")

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        server.requests.append((request.method, request.path_qs, dict(request.headers), body))
        return web.json_response(_looks_successful(request, body))

    runner, server.url = await _serve(handle)
    yield server
    await runner.cleanup()


@pytest.fixture(params=[302, 307])
async def redirector(request: pytest.FixtureRequest, other: Server) -> AsyncIterator[Server]:
    """Answers everything with a redirect to the other host (the same path, to tempt)."""
    status: int = request.param
    server = Server("")

    async def handle(request: web.Request) -> web.Response:
        server.requests.append((request.method, request.path_qs, dict(request.headers), b""))
        return web.Response(status=status, headers={"Location": f"{other.url}{request.path_qs}"})

    runner, server.url = await _serve(handle)
    yield server
    await runner.cleanup()


def assert_refused(exc: BaseException, redirector: Server, other: Server) -> None:
    text = str(exc)
    assert "redirect" in text and "never followed" in text, text
    assert other.url.removeprefix("http://") in text, text  # names where it pointed
    assert redirector.requests, "the request did not even reach the first server"
    assert other.requests == [], "a redirect was followed"


async def test_platform_delivery_is_not_redirected(redirector: Server, other: Server) -> None:
    platform = HttpPlatform(platform_settings(redirector.url), "platform-hmac-secret")
    try:
        with pytest.raises(Permanent) as caught:
            await platform.deliver("ORDER-1", "idem-ORDER-1", [CARD], "thanks")
    finally:
        await platform.close()
    assert_refused(caught.value, redirector, other)


async def test_order_listing_is_not_redirected(redirector: Server, other: Server) -> None:
    platform = HttpPlatform(platform_settings(redirector.url), "platform-hmac-secret")
    try:
        with pytest.raises(Permanent) as caught:
            await platform.list_paid(None)
        with pytest.raises(Permanent):
            await platform.get_order("ORDER-1")
    finally:
        await platform.close()
    assert_refused(caught.value, redirector, other)


def supplier_settings(name: str, kind: str, base_url: str, **extra: Any) -> SupplierSettings:
    values: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "base_url": base_url,
        "api_key": "supplier-key-id",
        "secret_name": f"supplier.{name}.secret",
        "timeout": 2.0,
        "query_grace": 0.05,
        "processing_poll": 0.05,
    }
    values.update(extra)
    return SupplierSettings(**values)


async def test_supplier_purchase_is_not_redirected(redirector: Server, other: Server) -> None:
    # Ambiguous, not a refusal: the purchase is then settled by asking about its reference,
    # never by buying the need again under a new one.
    suppliers = [
        HttpSupplier(supplier_settings("up", "http", redirector.url), "supplier-hmac-secret"),
        FuluSupplier(supplier_settings("fulu", "fulu", redirector.url), "f" * 32),
    ]
    for supplier in suppliers:
        try:
            with pytest.raises(Ambiguous) as caught:
                await supplier.purchase("kami-ref-1", "10000001", 1, Decimal("9.90"))
        finally:
            await supplier.close()
        assert_refused(caught.value, redirector, other)


MESSAGE = AlertMessage("low_stock:GAME-100", "low_stock", "opened", "warning", "GAME-100 low", 1.0)


async def test_alert_channels_are_not_redirected(redirector: Server, other: Server) -> None:
    base = redirector.url
    secrets = {
        "hook.secret": "webhook-hmac-secret-value",
        "tg.token": TG_TOKEN,
        "ding.url": f"{base}/robot/send?access_token=dingtalk-access-token-value",
        "wecom.url": f"{base}/cgi-bin/webhook/send?key=wecom-key-value-0000",
        "fs.url": f"{base}/open-apis/bot/v2/hook/feishu-hook-token-value-0000",
    }
    channels = [
        NotifySettings("hook", "webhook", {"url": f"{base}/hook", "secret": "hook.secret"}),
        NotifySettings("tg", "telegram", {"token": "tg.token", "chat_id": "42", "api_base": base}),
        NotifySettings("ding", "dingtalk", {"url_secret": "ding.url"}),
        NotifySettings("wecom", "wecom", {"url_secret": "wecom.url"}),
        NotifySettings("fs", "feishu", {"url_secret": "fs.url"}),
    ]
    for channel in channels:
        notifier = build_notifier(channel, secrets.__getitem__)
        try:
            with pytest.raises(Permanent) as caught:
                await notifier.send(MESSAGE)
        finally:
            await notifier.close()
        assert_refused(caught.value, redirector, other)
        for value in secrets.values():  # the location repeats the path, tokens and all
            assert value not in str(caught.value), channel.name
        assert "dingtalk-access-token-value" not in str(caught.value)
        assert "feishu-hook-token-value-0000" not in str(caught.value)


class RedirectingPlatform(SandboxPlatform):
    """The sandbox, except that its delivery endpoint redirects elsewhere."""

    target = ""

    async def _deliver(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": f"{self.target}{request.path}"})


async def test_engine_does_not_deliver_through_a_redirect(
    tmp_path: Path, sqlite_store: Store, other: Server
) -> None:
    platform = RedirectingPlatform(api_key="test-key", secret="test-secret", seed=1)
    platform.target = other.url
    await platform.start()
    try:
        await stock(sqlite_store, "GAME-100", 3)
        order_id = platform.add_order("GAME-100")
        config = make_config(tmp_path, platform.base_url)
        async with running_agent(config, sqlite_store, platform):
            await wait_for(
                line_state_is(sqlite_store, order_id, LineState.NEEDS_ATTENTION), "parked"
            )
    finally:
        await platform.stop()
    [line] = await sqlite_store.find_lines(order_id)
    assert "redirect" in (line.reason or ""), line.reason
    assert other.requests == []
    assert platform.orders[order_id].delivery is None


async def test_engine_never_buys_twice_after_a_redirected_purchase(
    tmp_path: Path, sqlite_store: Store, sandbox: SandboxPlatform, other: Server
) -> None:
    redirect_all = Server("")

    async def handle(request: web.Request) -> web.Response:
        redirect_all.requests.append((request.method, request.path_qs, {}, b""))
        return web.Response(status=307, headers={"Location": f"{other.url}{request.path_qs}"})

    runner, redirect_all.url = await _serve(handle)
    settings = supplier_settings("up", "http", redirect_all.url, unknown_window=1.0)
    sku = SkuSettings(sku="GAME-100", max_quantity=5, sources=("up",))
    base = make_config(tmp_path, sandbox.base_url, supplier_retry_interval=0.05)
    config = dataclasses.replace(base, skus={"GAME-100": sku}, suppliers=(settings,))
    order_id = sandbox.add_order("GAME-100")
    try:
        supplier = HttpSupplier(settings, "supplier-hmac-secret")
        async with running_agent(config, sqlite_store, sandbox, {"up": supplier}):
            await wait_for(
                line_state_is(sqlite_store, order_id, LineState.NEEDS_ATTENTION), "parked"
            )
    finally:
        await runner.cleanup()
    [line] = await sqlite_store.find_lines(order_id)
    purchases = await sqlite_store.purchases_for(line.id)
    assert len(purchases) == 1, "the need was bought again under a new reference"
    posts = [r for r in redirect_all.requests if r[0] == "POST"]
    assert posts and all(r[0] in ("POST", "GET") for r in redirect_all.requests)
    assert other.requests == []
    assert sandbox.orders[order_id].delivery is None

"""Alerts: once per crossing, escalation, recovery, the outbox, and every channel against a
real receiver on loopback (aiosmtpd for email, aiohttp servers for webhooks and robots)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

from agent.alerts import AlertEvaluator, OutboxDrainer
from agent.config import Config, NotifySettings, SkuSettings
from agent.domain import AlertMessage, AuthFailed, PlatformOrder
from agent.notify.base import Notifier
from agent.notify.email import EmailNotifier
from agent.notify.factory import build_notifier
from agent.notify.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, webhook_signature
from agent.store.base import Store
from tests.conftest import make_config, stock


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Inbox:
    """aiosmtpd handler collecting every message it is handed."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture
def smtp() -> Any:
    inbox = Inbox()
    with socket.socket() as probe:  # aiosmtpd needs a concrete port to self-check
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    controller.inbox = inbox  # type: ignore[attr-defined]
    yield controller
    controller.stop()


def email_to(controller: Any) -> EmailNotifier:
    return EmailNotifier(
        "mail",
        "127.0.0.1",
        controller.server.sockets[0].getsockname()[1],
        "kami@example.test",
        ("owner@example.test",),
        starttls=False,
    )


def low_stock_config(tmp_path: Path, **sku: Any) -> Config:
    base = make_config(tmp_path, "http://127.0.0.1:9")
    settings = SkuSettings(sku="GAME-100", max_quantity=10, **{"min_stock": 5, **sku})
    channels = (NotifySettings("mail", "email", {}),)
    return dataclasses.replace(base, skus={"GAME-100": settings}, notify=channels)


async def evaluate(config: Config, store: Store, clock: Clock) -> list[AlertMessage]:
    return await AlertEvaluator(config, store, clock, {}, {}).run()


async def test_one_email_per_crossing_then_recovery(
    tmp_path: Path, store: Store, smtp: Any
) -> None:
    clock = Clock()
    config = low_stock_config(tmp_path)
    await stock(store, "GAME-100", 3)  # below min_stock 5
    drainer = OutboxDrainer(store, {"mail": email_to(smtp)}, clock)
    for _ in range(5):  # the condition persists across many checks
        await evaluate(config, store, clock)
        await drainer.drain()
        clock.now += 30
    assert len(smtp.inbox.messages) == 1
    assert b"ALERT (warning): GAME-100" in smtp.inbox.messages[0]
    await stock(store, "GAME-100", 4, start=100)  # 7 keys: above 5 but inside the headroom
    await evaluate(config, store, clock)
    await drainer.drain()
    assert len(smtp.inbox.messages) == 1  # hysteresis: no flapping
    await stock(store, "GAME-100", 10, start=200)
    await evaluate(config, store, clock)
    await drainer.drain()
    assert len(smtp.inbox.messages) == 2 and b"RESOLVED" in smtp.inbox.messages[1]
    await store.void_free_keys("GAME-100", 16, "test", clock.now)  # drops again: re-armed
    await evaluate(config, store, clock)
    await drainer.drain()
    assert len(smtp.inbox.messages) == 3 and b"ALERT" in smtp.inbox.messages[2]


async def test_escalates_while_unresolved(tmp_path: Path, store: Store) -> None:
    clock = Clock()
    config = low_stock_config(tmp_path)
    config = dataclasses.replace(
        config, alerts=dataclasses.replace(config.alerts, escalate_after=600, max_escalations=2)
    )
    events = []
    for _ in range(10):
        events += [m.event for m in await evaluate(config, store, clock)]
        clock.now += 400
    assert events == ["opened", "escalated", "escalated"]


async def test_outbox_keeps_alerts_until_the_channel_works(
    tmp_path: Path, store: Store, smtp: Any
) -> None:
    clock = Clock()
    await evaluate(low_stock_config(tmp_path), store, clock)
    dead_port = EmailNotifier("mail", "127.0.0.1", 9, "a@b.test", ("c@d.test",), starttls=False)
    assert await OutboxDrainer(store, {"mail": dead_port}, clock).drain() == 0
    assert len(await store.due_outbox(clock.now + 3600, 10)) == 1  # still queued, retry later
    # a restart (new drainer, same ledger) with the server back delivers it
    clock.now += 3600
    assert await OutboxDrainer(store, {"mail": email_to(smtp)}, clock).drain() == 1
    assert len(smtp.inbox.messages) == 1


async def test_alert_fires_a_lead_time_before_the_first_unfilled_order(
    tmp_path: Path, store: Store
) -> None:
    """A simulated sales run: 30 orders/hour, 100 keys, lead time 1 h, checks every minute."""
    clock = Clock()
    lead_time = 3600.0
    config = low_stock_config(tmp_path, min_stock=0, lead_time=lead_time)
    config = dataclasses.replace(config, alerts=dataclasses.replace(config.alerts, half_life=1800))
    await stock(store, "GAME-100", 100)
    alert_at = first_unfilled_at = None
    order = 0
    for minute in range(24 * 60):
        clock.now += 60
        if minute % 2 == 0:  # one order every two minutes
            order += 1
            (line_id,) = await store.ingest(
                "main", [PlatformOrder(f"O{order}", "paid", "GAME-100", 1)], clock.now
            )
            line = await store.allocate(line_id, clock.now)
            if line.state.value == "backordered" and first_unfilled_at is None:
                first_unfilled_at = clock.now
        for message in await evaluate(config, store, clock):
            if message.key == "low_stock:GAME-100" and message.event == "opened" and not alert_at:
                alert_at = clock.now
        if first_unfilled_at is not None:
            break
    assert alert_at is not None and first_unfilled_at is not None
    print(f"alert {first_unfilled_at - alert_at:.0f} s before the first unfilled order")
    assert first_unfilled_at - alert_at >= lead_time


# --- channels against real receivers ----------------------------------------------------------

Handler = Callable[[web.Request], Any]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[web.Request], list[bytes]]]:
    seen: list[web.Request] = []
    bodies: list[bytes] = []
    replies = {
        "/hook": {},
        "/ding": {"errcode": 0},
        "/wecom": {"errcode": 0},
        "/feishu": {"code": 0},
        "/botTOKEN/sendMessage": {"ok": True},
    }

    async def handle(request: web.Request) -> web.Response:
        seen.append(request)
        bodies.append(await request.read())
        return web.json_response(replies[request.path])

    app = web.Application()
    for path in replies:
        app.router.add_post(path, handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", seen, bodies
    await runner.cleanup()


MESSAGE = AlertMessage("low_stock:GAME-100", "low_stock", "opened", "warning", "GAME-100 low", 1.0)


async def send(notifier: Notifier) -> None:
    try:
        await notifier.send(MESSAGE)
    finally:
        await notifier.close()


async def test_webhook_is_signed(receiver: tuple[str, list[web.Request], list[bytes]]) -> None:
    base, seen, bodies = receiver
    secrets = {"hook.secret": "s3cret"}
    await send(
        build_notifier(
            NotifySettings("hook", "webhook", {"url": f"{base}/hook", "secret": "hook.secret"}),
            secrets.__getitem__,
        )
    )
    request, body = seen[0], bodies[0]
    expected = webhook_signature("s3cret", request.headers[TIMESTAMP_HEADER], body)
    assert hmac.compare_digest(request.headers[SIGNATURE_HEADER], expected)
    assert json.loads(body)["key"] == "low_stock:GAME-100"
    forged = webhook_signature("wrong", request.headers[TIMESTAMP_HEADER], body)
    assert forged != request.headers[SIGNATURE_HEADER]


async def test_robot_formats_and_signatures(
    receiver: tuple[str, list[web.Request], list[bytes]],
) -> None:
    base, seen, bodies = receiver
    secrets = {
        "ding.url": f"{base}/ding?access_token=T",
        "ding.sign": "SECding",
        "wecom.url": f"{base}/wecom?key=K",
        "feishu.url": f"{base}/feishu",
        "feishu.sign": "SECfs",
        "tg.token": "TOKEN",
    }
    channels = [
        NotifySettings("ding", "dingtalk", {"url_secret": "ding.url", "sign_secret": "ding.sign"}),
        NotifySettings("wecom", "wecom", {"url_secret": "wecom.url"}),
        NotifySettings("fs", "feishu", {"url_secret": "feishu.url", "sign_secret": "feishu.sign"}),
        NotifySettings("tg", "telegram", {"token": "tg.token", "chat_id": "42", "api_base": base}),
    ]
    for channel in channels:
        await send(build_notifier(channel, secrets.__getitem__))
    ding, wecom, feishu, telegram = zip(seen, bodies, strict=True)
    # DingTalk: sign = base64(hmac_sha256(secret, "{timestamp}\n{secret}")) in the query
    query = parse_qs(ding[0].query_string)
    mac = hmac.new(b"SECding", f"{query['timestamp'][0]}\nSECding".encode(), hashlib.sha256)
    assert query["sign"][0] == base64.b64encode(mac.digest()).decode()
    assert json.loads(ding[1])["msgtype"] == "text"
    assert "GAME-100 low" in json.loads(wecom[1])["text"]["content"]
    # Feishu: sign = base64(hmac_sha256(key="{timestamp}\n{secret}", msg=""))
    body = json.loads(feishu[1])
    mac = hmac.new(f"{body['timestamp']}\nSECfs".encode(), b"", hashlib.sha256)
    assert body["sign"] == base64.b64encode(mac.digest()).decode()
    assert body["msg_type"] == "text"
    assert json.loads(telegram[1]) == {"chat_id": "42", "text": MESSAGE.text}


async def test_robot_error_reply_is_permanent(
    receiver: tuple[str, list[web.Request], list[bytes]],
) -> None:
    from agent.domain import Permanent

    base, _, _ = receiver
    # the /hook route answers {} — for a DingTalk robot that means no errcode 0
    notifier = build_notifier(
        NotifySettings("d", "dingtalk", {"url_secret": "u"}), {"u": f"{base}/hook?x=1"}.__getitem__
    )
    with pytest.raises(Permanent):
        await send(notifier)


async def test_auth_balance_stuck_and_attention_alerts(tmp_path: Path, store: Store) -> None:
    from decimal import Decimal

    from agent.config import SupplierSettings
    from agent.domain import RejectedOrder
    from agent.suppliers.base import Balance

    clock = Clock()
    base = low_stock_config(tmp_path, min_stock=0, lead_time=1.0, promise=60.0)
    supplier = SupplierSettings(
        name="up",
        kind="http",
        base_url="http://127.0.0.1:9",
        api_key="k",
        secret_name="s",
        balance_low=Decimal("100"),
    )
    config = dataclasses.replace(base, suppliers=(supplier,))
    await stock(store, "GAME-100", 100)
    await store.ingest(
        "main",
        [PlatformOrder("OLD", "paid", "GAME-100", 1), RejectedOrder("BAD", "unknown SKU 'X'")],
        clock.now,
    )
    balances = {"up": Balance(Decimal("42.00"), "CNY")}
    auth_failures: dict[str, AuthFailed] = {"main": AuthFailed("401 invalid token")}
    clock.now += 120  # OLD is now past its 60 s promise
    evaluator = AlertEvaluator(config, store, clock, balances, auth_failures)
    opened = {m.key: m for m in await evaluator.run()}
    assert set(opened) == {"balance:up", "auth:main", "stuck_orders", "needs_attention"}
    assert "OLD" in opened["stuck_orders"].summary and "42.00" in opened["balance:up"].summary
    auth_failures.clear()
    balances["up"] = Balance(Decimal("1000.00"), "CNY")
    resolved = {m.key for m in await evaluator.run() if m.event == "resolved"}
    assert resolved == {"balance:up", "auth:main"}

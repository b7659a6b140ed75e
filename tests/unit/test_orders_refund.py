"""A refund the merchant starts (issue 19, after-sales): through the platform's refund call
with the line's deterministic refund key committed first, the line closed `refunded`, its keys
still bound; refused, with nothing changed, where the platform refuses."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from agent.aftersales import ActionRefused, AfterSales
from agent.config import load_config
from agent.domain import LineState, PlatformOrder, refund_idempotency_key
from agent.platforms.base import Platform
from agent.platforms.http import HttpPlatform
from agent.platforms.woocommerce import WooCommerceOptions, WooCommercePlatform
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store
from agent.store.sqlite import SQLiteStore
from tests.conftest import make_config, master_key_for_tests, platform_settings, stock
from tests.unit.test_cli import cli, config_for

SKU = "GAME-100"


async def delivered(store: Store, sandbox: SandboxPlatform, quantity: int) -> int:
    order_id = sandbox.add_order(SKU, quantity)
    (line_id,) = await store.ingest(
        "main", [PlatformOrder(order_id, "paid", SKU, quantity)], time.time()
    )
    await store.allocate(line_id, time.time())
    await store.begin_delivery(line_id, time.time())
    await store.mark_delivered(line_id, time.time(), "ok")
    sandbox.orders[order_id].data["status"] = "delivered"
    return line_id


def aftersales(tmp_path: Path, store: Store, platform: Platform) -> AfterSales:
    config = make_config(tmp_path, "http://127.0.0.1:9")
    return AfterSales(config, store, lambda name: platform, time.time)


async def test_a_delivered_order_is_refunded_and_keeps_its_keys(
    store: Store, sandbox: SandboxPlatform, http_platform: HttpPlatform, tmp_path: Path
) -> None:
    await stock(store, SKU, 4)
    line_id = await delivered(store, sandbox, 2)
    bound = await store.bound_items(line_id)
    line = await store.get_line(line_id)
    assert line is not None
    acts = aftersales(tmp_path, store, http_platform)
    with pytest.raises(ActionRefused, match="reason"):
        await acts.refund(line, "  ")
    refunded = await acts.refund(line, "bad key reported by the buyer")
    assert refunded.state == LineState.REFUNDED
    assert refunded.reason == "bad key reported by the buyer"
    assert sandbox.refunds == [line.order_id]
    assert sandbox.orders[line.order_id].status == "refunded"
    assert await store.bound_items(line_id) == bound  # the buyer has seen them: never resold
    kinds = [e.kind for e in await store.events(line_id)]
    assert kinds[-2:] == ["refund_intent", "refunded"]
    key = refund_idempotency_key(line.platform, line.order_id, line.line)
    assert any(key in e.detail for e in await store.events(line_id))
    with pytest.raises(ActionRefused, match="already refunded"):
        await acts.refund(refunded, "again")
    assert sandbox.refunds == [line.order_id]


async def test_a_refund_the_platform_refuses_changes_nothing(
    store: Store, sandbox: SandboxPlatform, http_platform: HttpPlatform, tmp_path: Path
) -> None:
    await stock(store, SKU, 2)
    line_id = await delivered(store, sandbox, 1)
    line = await store.get_line(line_id)
    assert line is not None
    sandbox.orders[line.order_id].data["status"] = "cancelled"
    acts = aftersales(tmp_path, store, http_platform)
    with pytest.raises(ActionRefused, match="refused"):
        await acts.refund(line, "changed my mind")
    after = await store.get_line(line_id)
    assert after is not None and after.state == LineState.DELIVERED
    assert [e.kind for e in await store.events(line_id)][-2:] == [
        "refund_intent",
        "refund_refused",
    ]
    # A kind that never refunds by API (WooCommerce raises Permanent) is refused the same way.
    woo = WooCommercePlatform(
        platform_settings("http://127.0.0.1:9", kind="woocommerce", options=WooCommerceOptions()),
        "secret",
    )
    try:
        with pytest.raises(ActionRefused, match="refund it in the shop's admin"):
            await aftersales(tmp_path, store, woo).refund(after, "x")
    finally:
        await woo.close()
    again = await store.get_line(line_id)
    assert again is not None and again.state == LineState.DELIVERED
    assert sandbox.refunds == []


async def test_a_line_with_a_delivery_under_way_is_not_refunded(
    store: Store, sandbox: SandboxPlatform, http_platform: HttpPlatform, tmp_path: Path
) -> None:
    await stock(store, SKU, 2)
    order_id = sandbox.add_order(SKU, 1)
    (line_id,) = await store.ingest("main", [PlatformOrder(order_id, "paid", SKU, 1)], 1.0)
    await store.allocate(line_id, 1.0)
    await store.begin_delivery(line_id, 1.0)
    line = await store.get_line(line_id)
    assert line is not None
    with pytest.raises(ActionRefused, match="under way"):
        await aftersales(tmp_path, store, http_platform).refund(line, "x")
    assert sandbox.refunds == []


async def test_orders_refund_command(tmp_path: Path, sandbox: SandboxPlatform) -> None:
    config = await asyncio.to_thread(config_for, tmp_path, sandbox.base_url)
    store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
    await store.open()
    try:
        await stock(store, SKU, 2)
        line_id = await delivered(store, sandbox, 1)
        line = await store.get_line(line_id)
        assert line is not None
    finally:
        await store.close()
    assert load_config(config).platforms[0].name == "main"
    no_reason = await asyncio.to_thread(cli, config, "orders", "refund", line.order_id)
    assert no_reason.returncode != 0 and "--reason" in no_reason.stderr
    done = await asyncio.to_thread(
        cli,
        config,
        "orders",
        "refund",
        line.order_id,
        "--reason",
        "bad key",
        secret=sandbox.secret,
    )
    assert done.returncode == 0, done.stderr
    assert "now refunded" in done.stdout and sandbox.refunds == [line.order_id]
    again = await asyncio.to_thread(
        cli, config, "orders", "refund", line.order_id, "--reason", "x", secret=sandbox.secret
    )
    assert again.returncode == 1 and "already refunded" in again.stderr
    assert "Traceback" not in again.stderr
    (shown,) = json.loads(
        (await asyncio.to_thread(cli, config, "orders", "show", line.order_id, "--json")).stdout
    )
    assert shown["state"] == "refunded"


async def test_the_console_refunds_behind_csrf_with_a_reason(
    tmp_path: Path,
    sqlite_store: SQLiteStore,
    sandbox: SandboxPlatform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from agent.console.app import Console, build_app
    from tests.console_helpers import TOKEN, console_settings, log_in

    monkeypatch.setenv("KAMI_SECRET_PLATFORM_MAIN_SECRET", sandbox.secret)
    await stock(sqlite_store, SKU, 2)
    line_id = await delivered(sqlite_store, sandbox, 1)
    config = make_config(tmp_path, sandbox.base_url)
    console = Console(config, console_settings(), sqlite_store, None, TOKEN)
    client = TestClient(TestServer(build_app(console), host="127.0.0.1"))
    await client.start_server()
    try:
        csrf = await log_in(client)
        page = await (await client.get(f"/orders/{line_id}")).text()
        assert 'id="refund"' in page
        forged = await client.post(f"/orders/{line_id}/refund", data={"reason": "x"})
        assert forged.status == 403 and sandbox.refunds == []
        empty = await client.post(f"/orders/{line_id}/refund", data={"csrf": csrf, "reason": ""})
        assert "Say why" in await empty.text() and sandbox.refunds == []
        done = await client.post(
            f"/orders/{line_id}/refund", data={"csrf": csrf, "reason": "bad key"}
        )
        html = await done.text()
        assert "is now: refunded" in html and 'id="refund"' not in html
        assert len(sandbox.refunds) == 1
        line = await sqlite_store.get_line(line_id)
        assert line is not None and line.state == LineState.REFUNDED
    finally:
        await client.close()


async def test_an_unclear_refund_is_asked_again_with_the_same_key(
    store: Store, sandbox: SandboxPlatform, http_platform: HttpPlatform, tmp_path: Path
) -> None:
    await stock(store, SKU, 2)
    line_id = await delivered(store, sandbox, 1)
    line = await store.get_line(line_id)
    assert line is not None
    acts = aftersales(tmp_path, store, http_platform)
    sandbox.faults.error_rate = 1.0  # 503 every time: the outcome is not known
    with pytest.raises(ActionRefused, match="run the same refund again"):
        await acts.refund(line, "bad key")
    still = await store.get_line(line_id)
    assert still is not None and still.state == LineState.DELIVERED
    sandbox.faults.error_rate = 0.0
    done = await acts.refund(still, "bad key")
    assert done.state == LineState.REFUNDED and sandbox.refunds == [line.order_id]
    intents = [e.detail for e in await store.events(line_id) if e.kind == "refund_intent"]
    key = refund_idempotency_key(line.platform, line.order_id, line.line)
    assert len(intents) == 2 and all(key in d for d in intents)

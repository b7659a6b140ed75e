"""A bad key replaced on a delivered order (issue 19, after-sales): in one transaction the old
key void with the reason (naming its line, as the database requires), a fresh key of the SKU
in its slot, a new delivery generation; then the platform-http v1.1 replacement (`replaces`)
and the buyer's notice. Platforms that cannot replace are refused before anything changes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.aftersales import ActionRefused, AfterSales
from agent.domain import LineState, PlatformOrder
from agent.platforms.base import Platform
from agent.platforms.http import HttpPlatform
from agent.platforms.woocommerce import WooCommerceOptions, WooCommercePlatform
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store, StoreError
from agent.store.sqlite import SQLiteStore
from tests.conftest import make_config, master_key_for_tests, platform_settings, stock
from tests.helpers import line_state_is, running_agent, wait_for
from tests.unit.test_cli import cli, config_for

SKU = "GAME-100"


async def delivered_through(
    store: Store, sandbox: SandboxPlatform, platform: Platform, quantity: int
) -> int:
    """An order delivered as the engine delivers it: intent committed, the platform's call."""
    order_id = sandbox.add_order(SKU, quantity)
    (line_id,) = await store.ingest(
        "main", [PlatformOrder(order_id, "paid", SKU, quantity)], time.time()
    )
    await store.allocate(line_id, time.time())
    intent = await store.begin_delivery(line_id, time.time())
    await platform.deliver(order_id, intent.idempotency_key, intent.items, "here")
    await store.mark_delivered(line_id, time.time(), "ok")
    return line_id


def aftersales(tmp_path: Path, store: Store, platform: Platform) -> AfterSales:
    return AfterSales(
        make_config(tmp_path, "http://127.0.0.1:9"), store, lambda n: platform, time.time
    )


@pytest.mark.parametrize(
    ("languages", "expected"),
    [
        (
            {"language": "zh-CN"},
            "订单 %s：您收到的一个卡密已更换为新卡密（无法兑换），新卡密已发送到您的订单。",
        ),
        (  # a Chinese merchant selling to buyers who read English
            {"language": "zh-CN", "buyer_language": "en"},
            "Order %s: a key you received was replaced with a fresh one (无法兑换). The new key"
            " has been delivered to your order.",
        ),
    ],
)
async def test_the_buyer_is_told_of_a_replaced_key_in_the_buyers_language(
    store: Store,
    sandbox: SandboxPlatform,
    http_platform: HttpPlatform,
    tmp_path: Path,
    languages: dict[str, str],
    expected: str,
) -> None:
    await stock(store, SKU, 3)
    line_id = await delivered_through(store, sandbox, http_platform, 1)
    line = await store.get_line(line_id)
    assert line is not None
    config = make_config(tmp_path, "http://127.0.0.1:9", **languages)
    acts = AfterSales(config, store, lambda n: http_platform, time.time)
    await acts.replace_key(line, "无法兑换", slot=0)
    assert sandbox.orders[line.order_id].notices == [expected % line.order_id]


async def test_a_bad_key_is_replaced_and_the_buyer_told(
    store: Store, sandbox: SandboxPlatform, http_platform: HttpPlatform, tmp_path: Path
) -> None:
    await stock(store, SKU, 5)
    line_id = await delivered_through(store, sandbox, http_platform, 2)
    line = await store.get_line(line_id)
    assert line is not None
    before = await store.bound_items(line_id)
    acts = aftersales(tmp_path, store, http_platform)
    with pytest.raises(ActionRefused, match="name the slot"):
        await acts.replace_key(line, "does not redeem")
    done = await acts.replace_key(line, "does not redeem", slot=1)
    assert done.state == LineState.DELIVERED
    after = await store.bound_items(line_id)
    assert after[0] == before[0] and after[1] != before[1] and len(after) == 2
    remote = sandbox.orders[line.order_id]
    assert [i["secret"] for i in remote.delivery["items"]] == [k.secret for k in after]  # type: ignore[index]
    assert sandbox.delivery_calls[-1].outcome == "replaced"
    assert len(remote.notices) == 1 and "replaced" in remote.notices[0]
    assert done.delivery_key != line.delivery_key  # a new generation, a new idempotency key
    counts = {c.sku: (c.free, c.bound, c.void) for c in await store.stock_counts()}
    assert counts[SKU] == (2, 2, 1)
    kinds = [e.kind for e in await store.events(line_id)]
    assert kinds[-4:] == ["key_replaced", "delivery_intent", "delivered", "buyer_notice"]
    # The voided key never returns to stock, whatever the merchant tries.
    assert await store.unvoid_keys(SKU, "does not redeem", None, time.time()) == 0
    # Only a delivered order: the line is delivered again, so once more works; a line not
    # delivered is refused with nothing changed.
    again = await acts.replace_key(done, "still bad", slot=0)
    assert again.state == LineState.DELIVERED and len(remote.notices) == 2


async def test_no_fresh_key_or_not_delivered_changes_nothing(
    store: Store, sandbox: SandboxPlatform, http_platform: HttpPlatform, tmp_path: Path
) -> None:
    await stock(store, SKU, 1)
    line_id = await delivered_through(store, sandbox, http_platform, 1)
    line = await store.get_line(line_id)
    assert line is not None
    acts = aftersales(tmp_path, store, http_platform)
    with pytest.raises(ActionRefused, match="no free key"):
        await acts.replace_key(line, "bad")
    unchanged = await store.get_line(line_id)
    assert unchanged is not None and unchanged.state == LineState.DELIVERED
    assert unchanged.delivery_key == line.delivery_key
    await store.resend_line(line_id, time.time())  # delivering again: not replaceable now
    with pytest.raises(StoreError, match="only a delivered"):
        await store.replace_key(line_id, None, "bad", time.time())


async def test_a_platform_that_cannot_replace_is_refused_first(
    store: Store, sandbox: SandboxPlatform, http_platform: HttpPlatform, tmp_path: Path
) -> None:
    await stock(store, SKU, 3)
    line_id = await delivered_through(store, sandbox, http_platform, 1)
    line = await store.get_line(line_id)
    assert line is not None
    before = await store.bound_items(line_id)
    woo = WooCommercePlatform(
        platform_settings("http://127.0.0.1:9", kind="woocommerce", options=WooCommerceOptions()),
        "secret",
    )
    try:
        with pytest.raises(ActionRefused, match="cannot replace"):
            await aftersales(tmp_path, store, woo).replace_key(line, "bad")
    finally:
        await woo.close()
    same = await store.get_line(line_id)
    assert same is not None and same.state == LineState.DELIVERED
    assert await store.bound_items(line_id) == before
    assert not any(e.kind == "key_replaced" for e in await store.events(line_id))
    counts = {c.sku: (c.free, c.bound, c.void) for c in await store.stock_counts()}
    assert counts[SKU] == (2, 1, 0)


async def test_orders_replace_key_command(tmp_path: Path, sandbox: SandboxPlatform) -> None:
    config = await asyncio.to_thread(config_for, tmp_path, sandbox.base_url)
    store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
    await store.open()
    platform = HttpPlatform(platform_settings(sandbox.base_url), sandbox.secret)
    try:
        await stock(store, SKU, 3)
        line_id = await delivered_through(store, sandbox, platform, 1)
        line = await store.get_line(line_id)
        assert line is not None
        old = await store.bound_items(line_id)
    finally:
        await platform.close()
        await store.close()
    done = await asyncio.to_thread(
        cli,
        config,
        "orders",
        "replace-key",
        line.order_id,
        "--reason",
        "used already",
        secret=sandbox.secret,
    )
    assert done.returncode == 0, done.stderr
    assert "now delivered" in done.stdout
    secrets = [i["secret"] for i in sandbox.orders[line.order_id].delivery["items"]]  # type: ignore[index]
    assert secrets != [k.secret for k in old] and len(secrets) == 1
    assert len(sandbox.orders[line.order_id].notices) == 1


async def test_a_platform_1_0_refusing_the_replacement_parks_the_order(
    store: Store, sandbox: SandboxPlatform, http_platform: HttpPlatform, tmp_path: Path
) -> None:
    sandbox.replacement_offered = False  # ignores `replaces`: 409 already_delivered
    await stock(store, SKU, 2)
    line_id = await delivered_through(store, sandbox, http_platform, 1)
    line = await store.get_line(line_id)
    assert line is not None
    with pytest.raises(ActionRefused, match="cannot replace delivered keys"):
        await aftersales(tmp_path, store, http_platform).replace_key(line, "bad")
    parked = await store.get_line(line_id)
    assert parked is not None and parked.state == LineState.NEEDS_ATTENTION
    assert sandbox.orders[line.order_id].notices == []


async def test_the_console_replaces_a_key_behind_csrf(
    tmp_path: Path,
    sqlite_store: SQLiteStore,
    sandbox: SandboxPlatform,
    http_platform: HttpPlatform,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from agent.console.app import Console, build_app
    from tests.console_helpers import TOKEN, console_settings, log_in

    monkeypatch.setenv("KAMI_SECRET_PLATFORM_MAIN_SECRET", sandbox.secret)
    await stock(sqlite_store, SKU, 2)
    line_id = await delivered_through(sqlite_store, sandbox, http_platform, 1)
    old = await sqlite_store.bound_items(line_id)
    console = Console(
        make_config(tmp_path, sandbox.base_url), console_settings(), sqlite_store, None, TOKEN
    )
    client = TestClient(TestServer(build_app(console), host="127.0.0.1"))
    await client.start_server()
    try:
        csrf = await log_in(client)
        assert 'id="replace-key"' in await (await client.get(f"/orders/{line_id}")).text()
        forged = await client.post(f"/orders/{line_id}/replace-key", data={"reason": "x"})
        assert forged.status == 403
        done = await client.post(
            f"/orders/{line_id}/replace-key", data={"csrf": csrf, "reason": "used"}
        )
        assert "is now: delivered" in await done.text()
        assert await sqlite_store.bound_items(line_id) != old
    finally:
        await client.close()


async def test_a_replacement_whose_caller_died_is_finished_by_the_engine(
    store: Store, sandbox: SandboxPlatform, http_platform: HttpPlatform, tmp_path: Path
) -> None:
    """`orders replace-key` killed after its ledger step (old key void, fresh key bound, a new
    delivery generation committed) and before the platform's call: once the caller's grace
    is over, the engine's sweep finishes the replacement and tells the buyer, instead of
    parking the line because the platform still shows the old key."""
    await stock(store, SKU, 3)
    line_id = await delivered_through(store, sandbox, http_platform, 1)
    [old] = await store.bound_items(line_id)
    await store.replace_key(line_id, None, "does not redeem", time.time())
    await store.begin_delivery(line_id, time.time())  # ... and the process was killed here
    await store.defer(line_id, 0.0, "grace over", ambiguous=False, now=time.time())
    [fresh] = await store.bound_items(line_id)
    assert fresh != old
    line = await store.get_line(line_id)
    assert line is not None and line.replaces is not None
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(line_state_is(store, line.order_id, LineState.DELIVERED), "the replacement")
    remote = sandbox.orders[line.order_id]
    assert [i["secret"] for i in remote.delivery["items"]] == [fresh.secret]  # type: ignore[index]
    assert sandbox.delivery_calls[-1].outcome == "replaced"
    assert len(remote.notices) == 1 and "replaced" in remote.notices[0]
    done = await store.get_line(line_id)
    assert done is not None and done.replaces is None

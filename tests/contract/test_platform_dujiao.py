"""kami-agent as a dujiao-next shop's supplier (agent/platforms/dujiao.py) behind the real
listener, driven by the doc-built shop (tests/fakes/dujiao.py): signed calls, products with
the stock that can be filled, orders idempotent on downstream_order_no (repeats and
concurrent repeats get the stored bytes, never new keys), keys bound at order time, the
callback delivered from the outbox through a receiver that fails sometimes, the shop's
polling answered, cancels refused once keys are handed over, callbacks only to the shop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import pytest

from agent.config import PlatformSettings, SkuSettings
from agent.domain import LineState
from agent.listener import Listener, listener_mounts
from agent.listener_routes import ListenerContext
from agent.listener_settings import ListenerSettings
from agent.platforms.dujiao import DujiaoOptions, DujiaoPlatform
from agent.platforms.dujiao_wire import Product
from agent.stocksync import StockSync
from agent.store.sqlite import SQLiteStore
from tests.conftest import stock
from tests.fakes.dujiao import FakeShop
from tests.helpers import wait_for

API_KEY = "dj-key-001"
SECRET = "dj-secret-for-kami-tests"


@dataclass
class Rig:
    shop: FakeShop
    platform: DujiaoPlatform
    listener: Listener
    store: SQLiteStore


async def make_rig(store: SQLiteStore, shop: FakeShop, prefix: str = "") -> Rig:
    settings = PlatformSettings(
        name="shop",
        kind="dujiao-next",
        base_url=shop.base_url,
        api_key=API_KEY,
        secret_name="dujiao.secret",
        timeout=2.0,
        options=None,
    )
    options = DujiaoOptions(
        products={
            1: Product(1, "GAME-100", Decimal("9.90"), "Game 100"),
            2: Product(2, "VIP-30D", Decimal("30"), "VIP 30 days"),
        },
        path_prefix=prefix,
        callback_interval=0.05,
        callback_retry=0.05,
    )
    platform = DujiaoPlatform(settings, options, SECRET)
    context = ListenerContext(store, time.time)
    mounts = listener_mounts({"shop": platform}, {"shop": "dujiao-next"}, context)
    listener = Listener(ListenerSettings(port=0), mounts, store)
    await listener.start()
    assert listener.address is not None
    shop.upstream_url = f"http://127.0.0.1:{listener.address[1]}{prefix}"
    return Rig(shop, platform, listener, store)


@pytest.fixture
async def shop() -> AsyncIterator[FakeShop]:
    fake = FakeShop(API_KEY, SECRET, retry_base=0.05)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def rig(sqlite_store: SQLiteStore, shop: FakeShop) -> AsyncIterator[Rig]:
    r = await make_rig(sqlite_store, shop)
    yield r
    await r.listener.stop()
    await r.platform.close()


async def test_ping_and_products_show_what_can_be_filled(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 25)
    await stock(rig.store, "VIP-30D", 3)
    ping = await rig.shop.ping()
    assert ping.status == 200 and ping.json()["ok"] is True
    assert ping.json()["protocol_version"] == "1.0"
    listing = (await rig.shop.products()).json()
    assert listing["total"] == 2
    skus = {p["id"]: p["skus"][0] for p in listing["items"]}
    assert skus[1]["stock_quantity"] == 25 and skus[1]["stock_status"] == "in_stock"
    assert skus[2]["stock_quantity"] == 3 and skus[2]["stock_status"] == "low_stock"
    assert skus[1]["price_amount"] == "9.90"
    one = await rig.shop.request("GET", "/api/v1/upstream/products/2")
    assert one.json()["product"]["skus"][0]["sku_code"] == "VIP-30D"
    missing = await rig.shop.request("GET", "/api/v1/upstream/products/9")
    assert missing.status == 404 and missing.json()["error_code"] == "product_not_found"
    # The stock sync's count for this shop wins over the free keys (its share).
    sync = StockSync(
        {s: SkuSettings(sku=s) for s in ("GAME-100", "VIP-30D")},
        rig.store,
        {"shop": rig.platform},
        {},
    )
    await sync.step()
    assert rig.platform.published == {"GAME-100": 25, "VIP-30D": 3}


async def test_an_order_repeated_or_raced_gets_the_same_reply_and_keys(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 10)
    first = await rig.shop.create_order(1, 2, "A-1")
    assert first.status == 200 and first.json()["ok"] is True
    repeats = await asyncio.gather(*(rig.shop.create_order(1, 2, "A-1") for _ in range(10)))
    assert {r.body for r in repeats} == {first.body}
    other = await rig.shop.create_order(1, 3, "A-2")
    assert other.json()["order_id"] != first.json()["order_id"]
    counts = {c.sku: c for c in await rig.store.stock_counts()}
    assert counts["GAME-100"].bound == 5 and counts["GAME-100"].free == 5
    assert first.json()["amount"] == "19.80"


async def test_an_order_short_of_stock_binds_nothing_and_may_succeed_later(rig: Rig) -> None:
    await stock(rig.store, "VIP-30D", 1)
    short = await rig.shop.create_order(2, 2, "B-1")
    assert short.status == 409 and short.json()["error_code"] == "insufficient_stock"
    assert await rig.store.find_lines("B-1") == []
    await stock(rig.store, "VIP-30D", 2, start=5)
    assert (await rig.shop.create_order(2, 2, "B-1")).status == 200


async def test_bad_orders_are_refused_with_the_shops_error_codes(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 2)
    r = rig.shop
    for payload, code in (
        ({"sku_id": 1, "quantity": 1}, "bad_request"),  # no downstream_order_no
        ({"sku_id": 7, "quantity": 1, "downstream_order_no": "C-1"}, "sku_unavailable"),
        ({"sku_id": 1, "quantity": 0, "downstream_order_no": "C-2"}, "bad_request"),
        (
            {
                "sku_id": 1,
                "quantity": 1,
                "downstream_order_no": "C-3",
                "callback_url": "http://169.254.169.254/latest/meta-data",
            },
            "invalid_callback_url",
        ),
    ):
        answer = await r.request("POST", "/api/v1/upstream/orders", payload)
        assert answer.status == 400 and answer.json()["error_code"] == code, payload
    assert (await rig.store.stock_counts())[0].free == 2


async def test_the_callback_arrives_through_failures_and_matches_the_polled_order(
    rig: Rig,
) -> None:
    rig.shop.fail_rate = 0.6
    await stock(rig.store, "GAME-100", 20)
    orders = {}
    for n in range(6):
        answer = await rig.shop.create_order(1, 1 + n % 3, f"D-{n}")
        orders[f"D-{n}"] = answer.json()["order_id"]

    def all_called_back() -> bool:
        return {c.downstream_order_no for c in rig.shop.callbacks} == set(orders)

    await wait_for(all_called_back, "every callback acknowledged")
    assert rig.shop.callback_attempts > len(orders)  # some failed and were tried again
    assert rig.shop.refused_callbacks == 0
    seen: dict[str, str] = {}
    for received in rig.shop.callbacks:
        number = received.downstream_order_no
        polled = (await rig.shop.get_order(orders[number])).json()
        assert polled["status"] == "delivered"
        assert received.body["fulfillment"]["payload"] == polled["fulfillment"]["payload"]
        assert received.body["order_id"] == orders[number]
        [line] = await rig.store.find_lines(number)
        assert line.state == LineState.DELIVERED
        bound = [i.secret for i in await rig.store.bound_items(line.id)]
        assert (
            polled["fulfillment"]["payload"].split("\n")
            == [f"GAME-100-{s.split('-')[-1].lstrip('0') or '0'} {s}" for s in bound]
            or len(bound) == line.quantity
        )
        for key in bound:
            assert seen.setdefault(key, number) == number, "a key on two orders"


async def test_polling_answers_and_cancels_are_refused_once_handed_over(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 2)
    created = (await rig.shop.create_order(1, 1, "E-1", callback=False)).json()
    polled = await rig.shop.get_order(created["order_id"])
    assert polled.status == 200 and polled.json()["fulfillment"]["status"] == "delivered"
    [line] = await rig.store.find_lines("E-1")
    assert line.state == LineState.DELIVERED  # the shop read its keys
    cancel = await rig.shop.cancel(created["order_id"])
    assert cancel.status == 409 and cancel.json()["error_code"] == "cancel_not_allowed"
    for missing in (999999, created["order_id"] + 100):
        answer = await rig.shop.get_order(missing)
        assert answer.status == 404 and answer.json()["error_code"] == "order_not_found"
    assert (await rig.shop.request("GET", "/api/v1/upstream/orders/abc")).status == 404


async def test_a_shop_with_a_skewed_clock_or_wrong_secret_is_refused(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 2)
    rig.shop.clock_skew = 90
    answer = await rig.shop.create_order(1, 1, "F-1", tries=1)
    assert answer.status == 401 and answer.json()["error_code"] == "timestamp_expired"
    rig.shop.clock_skew = 0
    rig.shop.secret = "not-the-secret"
    answer = await rig.shop.create_order(1, 1, "F-1", tries=1)
    assert answer.status == 401 and answer.json()["error_code"] == "invalid_signature"
    assert await rig.store.find_lines("F-1") == []


async def test_a_shop_under_a_path_prefix_signs_the_path_without_it(
    sqlite_store: SQLiteStore, shop: FakeShop
) -> None:
    rig = await make_rig(sqlite_store, shop, prefix="/shop-a")
    try:
        await stock(sqlite_store, "GAME-100", 1)
        assert (await shop.ping()).status == 200
        assert (await shop.create_order(1, 1, "G-1")).status == 200
    finally:
        await rig.listener.stop()
        await rig.platform.close()


async def test_callbacks_to_a_shop_under_a_sub_path_are_signed_over_the_fixed_path(
    sqlite_store: SQLiteStore,
) -> None:
    # The shop's receiver (HandleCallback) and dujiao-next's own sender (SendCallback) both
    # sign POST /api/v1/upstream/callback, whatever the callback URL's path is.
    shop = FakeShop(API_KEY, SECRET, retry_base=0.05, callback_prefix="/shop")
    await shop.start()
    rig = await make_rig(sqlite_store, shop)
    try:
        await stock(sqlite_store, "GAME-100", 1)
        assert shop.callback_url.endswith("/shop/api/v1/upstream/callback")
        assert (await shop.create_order(1, 1, "H-1")).status == 200
        await wait_for(lambda: bool(shop.callbacks), "the callback acknowledged")
        assert shop.refused_callbacks == 0
        # The event name dujiao-next's own sender uses for a delivered order.
        assert shop.callbacks[0].body["event"] == "order.fulfilled"
    finally:
        await rig.listener.stop()
        await rig.platform.close()
        await shop.stop()

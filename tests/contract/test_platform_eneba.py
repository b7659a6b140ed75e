"""Eneba's declared stock (agent/platforms/eneba.py) behind the real listener, called by the
doc-built fake (tests/fakes/eneba.py): RESERVE binds or refuses whole, PROVIDE answers the
bound keys on every attempt (retries, duplicates, concurrent calls, a listener down for the
first attempt), CANCEL releases or voids, unpaid reservations run out, declared stock is
published from what can be filled, provisions are confirmed from P_declaredStockResult."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import structlog.testing

from agent.config import PlatformSettings, SkuSettings
from agent.domain import KeyState, LineState, Transient
from agent.listener import Listener, listener_mounts
from agent.listener_routes import ListenerContext
from agent.listener_settings import ListenerSettings
from agent.platforms.eneba import EnebaOptions, EnebaPlatform
from agent.stocksync import StockSync
from agent.store.sqlite import SQLiteStore
from tests.conftest import stock
from tests.fakes.eneba import FakeEneba
from tests.helpers import wait_for

TOKEN = "ZW5lYmEtY2FsbGJhY2stdG9rZW4tZm9yLXRlc3Rz"
AUTH_ID = "auth-id-1"
AUTH_SECRET = "eneba-auth-secret-for-tests"
AUCTION = "3e5b2f9a-1111-11ee-be56-0242ac120002"
AUCTION_VIP = "3e5b2f9a-2222-11ee-be56-0242ac120002"


@dataclass
class Rig:
    fake: FakeEneba
    platform: EnebaPlatform
    listener: Listener
    store: SQLiteStore
    url: str


def options(**over: Any) -> EnebaOptions:
    values: dict[str, Any] = {
        "auctions": {AUCTION: "GAME-100", AUCTION_VIP: "VIP-30D"},
        "callback_token_secret": "eneba.callback",
        "sweep_interval": 0.1,
        "reconcile_after": 0.05,
        "update_spacing": 0.5,  # Eneba's 30 s between updates of an auction, scaled down
    }
    values.update(over)
    return EnebaOptions(**values)


async def make_rig(
    store: SQLiteStore,
    fake: FakeEneba,
    monotonic: Callable[[], float] = time.monotonic,
    **over: Any,
) -> Rig:
    settings = PlatformSettings(
        name="eneba",
        kind="eneba",
        base_url=f"{fake.base_url}/graphql",
        api_key=AUTH_ID,
        secret_name="eneba.secret",
        timeout=5.0,
        options=None,
    )
    opts = options(token_url=f"{fake.base_url}/oauth/token", **over)
    platform = EnebaPlatform(settings, opts, AUTH_SECRET, TOKEN, monotonic=monotonic)
    mounts = listener_mounts(
        {"eneba": platform}, {"eneba": "eneba"}, ListenerContext(store, time.time)
    )
    listener = Listener(ListenerSettings(port=0), mounts, store)
    await listener.start()
    assert listener.address is not None
    url = f"http://127.0.0.1:{listener.address[1]}/eneba/eneba"
    fake.callback_url = url
    return Rig(fake, platform, listener, store, url)


@pytest.fixture
async def fake() -> AsyncIterator[FakeEneba]:
    server = FakeEneba(TOKEN, AUTH_ID, AUTH_SECRET, gap=0.05, timeout=5.0, update_every=0.5)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def rig(sqlite_store: SQLiteStore, fake: FakeEneba) -> AsyncIterator[Rig]:
    r = await make_rig(sqlite_store, fake)
    yield r
    await r.listener.stop()
    await r.platform.close()


async def key_states(store: SQLiteStore) -> dict[str, int]:
    counts = {c.sku: c for c in await store.stock_counts()}
    c = counts["GAME-100"]
    return {"free": c.free, "bound": c.bound, "void": c.void}


async def test_reserve_then_provide_hands_over_the_reserved_keys(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 5)
    assert await rig.fake.reserve("o-1", [(AUCTION, 2)])
    [line] = await rig.store.find_lines("o-1")
    assert line.state == LineState.RESERVED
    reserved = [i.secret for i in await rig.store.bound_items(line.id)]
    keys = await rig.fake.provide("o-1")
    assert keys is not None and [k.split("\n")[-1] for k in keys[AUCTION]] == reserved
    [line] = await rig.store.find_lines("o-1")
    assert line.state == LineState.PROVIDED
    assert await key_states(rig.store) == {"free": 3, "bound": 2, "void": 0}


async def test_every_provide_attempt_gets_the_same_bytes_duplicates_and_concurrent_ones_too(
    rig: Rig,
) -> None:
    await stock(rig.store, "GAME-100", 10)
    await stock(rig.store, "VIP-30D", 3)
    assert await rig.fake.reserve("o-2", [(AUCTION, 3), (AUCTION_VIP, 1)])
    body = json.dumps({"action": "PROVIDE", "orderId": "o-2"}).encode()
    async with aiohttp.ClientSession() as http:

        async def provide() -> bytes:
            resp = await http.post(rig.url, data=body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert resp.status == 200
            return await resp.read()

        answers = await asyncio.gather(*(provide() for _ in range(20)))
        later = [await provide() for _ in range(3)]
    assert len(set(answers + later)) == 1
    reply = json.loads(answers[0])
    assert {a["auctionId"]: len(a["keys"]) for a in reply["auctions"]} == {
        AUCTION: 3,
        AUCTION_VIP: 1,
    }
    assert await key_states(rig.store) == {"free": 7, "bound": 3, "void": 0}


async def test_a_provide_whose_first_attempt_finds_the_listener_down_gets_the_keys_after(
    sqlite_store: SQLiteStore, fake: FakeEneba
) -> None:
    fake.gap = 0.5
    rig = await make_rig(sqlite_store, fake)
    await stock(sqlite_store, "GAME-100", 4)
    assert await fake.reserve("o-3", [(AUCTION, 2)])
    [line] = await sqlite_store.find_lines("o-3")
    reserved = [i.secret for i in await sqlite_store.bound_items(line.id)]
    port = rig.listener.address[1]  # type: ignore[index]
    await rig.listener.stop()  # the agent restarts...
    settings = ListenerSettings(port=port)

    async def come_back() -> None:
        await asyncio.sleep(0.2)
        rig.listener = Listener(
            settings,
            [
                m
                for m in listener_mounts(
                    {"eneba": rig.platform},
                    {"eneba": "eneba"},
                    ListenerContext(sqlite_store, time.time),
                )
            ],
            sqlite_store,
        )
        await rig.listener.start()

    back = asyncio.create_task(come_back())
    keys = await fake.provide("o-3")
    await back
    attempts = fake.orders["o-3"].calls["DECLARED_STOCK_PROVISION"]
    assert attempts[0].status == 0 and attempts[-1].status == 200
    assert keys is not None and [k.split("\n")[-1] for k in keys[AUCTION]] == reserved
    await rig.listener.stop()
    await rig.platform.close()


async def test_a_reservation_short_of_keys_binds_nothing(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 3)
    await stock(rig.store, "VIP-30D", 1)
    assert not await rig.fake.reserve("o-4", [(AUCTION, 2), (AUCTION_VIP, 2)])
    assert await rig.store.find_lines("o-4") == []
    assert await key_states(rig.store) == {"free": 3, "bound": 0, "void": 0}
    # Told no, it stays no, even with stock back: Eneba told the buyer it is unavailable.
    await stock(rig.store, "VIP-30D", 5, start=10)
    assert not await rig.fake.reserve("o-4", [(AUCTION, 2), (AUCTION_VIP, 2)])
    assert not await rig.fake.reserve("o-5", [("not-our-auction", 1)])
    assert await rig.fake.provide("o-4") is None  # nothing to hand out


async def test_cancel_before_provide_releases_and_after_provide_voids(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 6)
    assert await rig.fake.reserve("early", [(AUCTION, 2)])
    assert await rig.fake.reserve("late", [(AUCTION, 2)])
    assert await rig.fake.cancel("early")
    assert await key_states(rig.store) == {"free": 4, "bound": 2, "void": 0}
    assert await rig.fake.provide("late") is not None
    assert await rig.fake.cancel("late")
    assert await key_states(rig.store) == {"free": 4, "bound": 0, "void": 2}
    voided = [k for k in await rig.store.export_keys("GAME-100", KeyState.VOID)]
    assert len(voided) == 2
    for order in ("early", "late"):
        [line] = await rig.store.find_lines(order)
        assert line.state == LineState.CANCELLED


async def test_malformed_callbacks_are_refused_and_nothing_changes(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 2)
    async with aiohttp.ClientSession() as http:
        for body in (
            b"not json",
            b"[]",
            b'{"action": "STEAL", "orderId": "x"}',
            b'{"action": "RESERVE", "orderId": "x", "auctions": []}',
            json.dumps(
                {
                    "action": "RESERVE",
                    "orderId": "x",
                    "auctions": [{"auctionId": AUCTION, "keyCount": -1}],
                }
            ).encode(),
            json.dumps(
                {
                    "action": "RESERVE",
                    "orderId": "x",
                    "auctions": [{"auctionId": AUCTION, "keyCount": 10**9}],
                }
            ).encode(),
            json.dumps({"action": "PROVIDE", "orderId": "a\u0000b"}).encode(),
            json.dumps({"action": "PROVIDE", "orderId": "x" * 500}).encode(),
            b'{"action": "PROVIDE", "orderId": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        ):
            resp = await http.post(rig.url, data=body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert resp.status == 400, body[:60]
    assert await key_states(rig.store) == {"free": 2, "bound": 0, "void": 0}


async def test_unpaid_reservations_are_released_by_the_sweep(
    sqlite_store: SQLiteStore, fake: FakeEneba
) -> None:
    rig = await make_rig(sqlite_store, fake, reserve_hours=0.5 / 3600)
    try:
        await stock(sqlite_store, "GAME-100", 3)
        assert await fake.reserve("unpaid", [(AUCTION, 2)])
        assert await key_states(sqlite_store) == {"free": 1, "bound": 2, "void": 0}

        async def released() -> bool:
            return await key_states(sqlite_store) == {"free": 3, "bound": 0, "void": 0}

        await wait_for(released, "the unpaid reservation released")
        assert await fake.provide("unpaid") is None
    finally:
        await rig.listener.stop()
        await rig.platform.close()


async def test_provisions_are_confirmed_from_the_declared_stock_result(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 3)
    assert await rig.fake.reserve("o-6", [(AUCTION, 1)])
    assert await rig.fake.provide("o-6") is not None

    async def delivered() -> bool:
        [line] = await rig.store.find_lines("o-6")
        return line.state == LineState.DELIVERED

    await wait_for(delivered, "the provision confirmed")


async def test_declared_stock_is_what_can_be_filled_reserved_keys_excluded(rig: Rig) -> None:
    await stock(rig.store, "GAME-100", 5)
    skus = {s: SkuSettings(sku=s) for s in ("GAME-100", "VIP-30D")}
    sync = StockSync(skus, rig.store, {"eneba": rig.platform}, {})
    await sync.step()
    assert rig.fake.declared == {AUCTION: 5, AUCTION_VIP: 0}
    assert await rig.fake.reserve("o-7", [(AUCTION, 2)])
    await asyncio.sleep(0.6)  # a lower count goes out at most every 0.5 s
    await sync.step()
    assert rig.fake.declared[AUCTION] == 3


async def test_a_count_held_for_enebas_spacing_is_no_failure_and_goes_out_then(
    sqlite_store: SQLiteStore, fake: FakeEneba
) -> None:
    # The adapter holds a lower count back until the auction's spacing allows it: the stock
    # sync neither counts that a failure (no back-off, no warning each time) nor forgets it.
    rig = await make_rig(sqlite_store, fake, update_spacing=2.0)
    try:
        await stock(rig.store, "GAME-100", 5)
        skus = {"GAME-100": SkuSettings(sku="GAME-100")}
        sync = StockSync(skus, rig.store, {"eneba": rig.platform}, {})
        await sync.step()
        assert rig.fake.declared[AUCTION] == 5
        assert await rig.fake.reserve("o-held", [(AUCTION, 2)])
        await asyncio.sleep(0.6)  # past the stock sync's own spacing of a lower count
        with structlog.testing.capture_logs() as logs:
            await sync.step()
        outlet = sync.outlets["eneba", "GAME-100"]
        assert rig.fake.declared[AUCTION] == 5 and outlet.failures == 0
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == []
        assert [e["available"] for e in logs if e["event"] == "stock_publish_held"] == [3]
        await wait_for(lambda: time.monotonic() >= outlet.retry_at, "the spacing to pass")
        await sync.step()
        assert rig.fake.declared[AUCTION] == 3 and rig.fake.refused_updates == 0
    finally:
        await rig.listener.stop()
        await rig.platform.close()


async def test_reserve_prices_are_cents_and_a_line_keeps_its_total(rig: Rig) -> None:
    # Eneba's money is an Int of cents (guide/purchasing-keys: 1500 -> EUR 15.00): two keys
    # at 1399 are a line of 27.98 EUR in the ledger, not of 1399.
    rig.fake.price_cents = 1399
    await stock(rig.store, "GAME-100", 3)
    assert await rig.fake.reserve("o-cents", [(AUCTION, 2)])
    with closing(sqlite3.connect(rig.store.path)) as db:
        rows = db.execute(
            "SELECT amount, currency FROM orders WHERE order_id = ?", ("o-cents",)
        ).fetchall()
    assert rows == [("27.98", "EUR")]


async def test_declared_stock_updates_keep_enebas_spacing_per_auction(
    sqlite_store: SQLiteStore, fake: FakeEneba
) -> None:
    # "You can update each auction only once every 30 seconds" (S_updateAuction): an update
    # asked sooner is not sent (Eneba would refuse it) but put off, with the wait.
    now = [1000.0]
    fake.monotonic = lambda: now[0]
    fake.update_every = 30.0
    rig = await make_rig(sqlite_store, fake, lambda: now[0], update_spacing=30.0)
    try:
        await rig.platform.publish_stock("GAME-100", 5)
        now[0] += 10
        with pytest.raises(Transient) as raised:
            await rig.platform.publish_stock("GAME-100", 3)
        assert raised.value.retry_after == pytest.approx(20.0)
        await rig.platform.publish_stock("VIP-30D", 1)  # another auction: its own spacing
        now[0] += 20
        await rig.platform.publish_stock("GAME-100", 3)
        assert fake.refused_updates == 0
        assert fake.declared_log == [(AUCTION, 5), (AUCTION_VIP, 1), (AUCTION, 3)]
    finally:
        await rig.listener.stop()
        await rig.platform.close()

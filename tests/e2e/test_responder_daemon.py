"""The real daemon answering Eneba and a dujiao-next shop through its listener, SIGKILLed three
times while they call (tests/fakes/eneba.py with Eneba's retry cadence scaled down,
tests/fakes/dujiao.py with the shop's backoff): every order gets the same keys on every
attempt, no key goes to two orders, no reservation keeps stock it should not, and nothing
of a key, token or secret reaches the log.

Restarts are immediate, as with systemd's socket unit holding the port (here the port is
simply bound again): a PROVIDE arriving while the agent restarts is refused or cut off and
Eneba's next attempt, 5 s later (scaled), is answered."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.domain import KeyState, LineState
from agent.store.sqlite import SQLiteStore
from tests.conftest import master_key_for_tests
from tests.daemon import import_stock, start_daemon
from tests.fakes.dujiao import FakeShop
from tests.fakes.eneba import PROVISION, FakeEneba

TOKEN = "ZW5lYmEtZGFlbW9uLWNhbGxiYWNrLXRva2Vu"
AUTH_ID = "auth-id-daemon"
AUTH_SECRET = "eneba-auth-secret-daemon-tests"
DJ_KEY = "dj-daemon-key"
DJ_SECRET = "dj-daemon-secret-for-tests"
AUCTION = "a1f0c6de-0000-11ee-be56-0242ac120002"
AUCTION_VIP = "a1f0c6de-1111-11ee-be56-0242ac120002"
SECRETS = {
    "KAMI_SECRET_ENEBA_SECRET": AUTH_SECRET,
    "KAMI_SECRET_ENEBA_CALLBACK": TOKEN,
    "KAMI_SECRET_DUJIAO_SECRET": DJ_SECRET,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, port: int, eneba: FakeEneba, shop: FakeShop) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[agent]
poll_interval = 1.0
sweep_interval = 0.5
concurrency = 4

[store]
path = "kami.db"

[listener]
port = {port}
header_timeout = 5.0
body_timeout = 5.0

[platforms.eneba]
kind = "eneba"
base_url = "{eneba.base_url}/graphql"
token_url = "{eneba.base_url}/oauth/token"
api_key = "{AUTH_ID}"
secret = "eneba.secret"
callback_token = "eneba.callback"
reserve_hours = {8 / 3600}
sweep_interval = 0.5
reconcile_after = 1.0

[platforms.eneba.auctions]
"{AUCTION}" = "GAME-100"
"{AUCTION_VIP}" = "VIP-30D"

[platforms.shop]
kind = "dujiao-next"
base_url = "{shop.base_url}"
api_key = "{DJ_KEY}"
secret = "dujiao.secret"
callback_interval = 0.2
callback_retry = 0.2

[platforms.shop.products]
"1" = {{ sku = "GAME-100", price = "9.90", title = "Game 100" }}

[skus."GAME-100"]
[skus."VIP-30D"]
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
async def eneba() -> AsyncIterator[FakeEneba]:
    fake = FakeEneba(TOKEN, AUTH_ID, AUTH_SECRET, gap=1.0, timeout=10.0)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def shop() -> AsyncIterator[FakeShop]:
    fake = FakeShop(DJ_KEY, DJ_SECRET, retry_base=0.5, fail_rate=0.3, seed=5)
    await fake.start()
    yield fake
    await fake.stop()


async def listening(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("the daemon's listener never came up")


async def eneba_order(fake: FakeEneba, n: int, rng: random.Random) -> None:
    order = f"en-{n:03d}"
    auctions = [(AUCTION, 1 + rng.randrange(2))]
    if rng.random() < 0.3:
        auctions.append((AUCTION_VIP, 1))
    if not await fake.reserve(order, auctions):
        return  # Eneba tells the buyer the stock is gone
    await asyncio.sleep(rng.uniform(0.0, 1.5))  # the buyer pays
    roll = rng.random()
    if roll < 0.15:
        await fake.cancel(order)
        return
    if roll < 0.35:  # Eneba's callback sent twice at once
        await asyncio.gather(fake.provide(order), fake.provide(order))
    else:
        await fake.provide(order)
    if fake.orders[order].keys is not None and rng.random() < 0.1:
        await fake.cancel(order)  # the order fails after the keys were handed over


async def shop_order(shop: FakeShop, n: int, rng: random.Random) -> tuple[str, int | None]:
    number = f"DJ-{n:03d}"
    answer = await shop.create_order(1, 1 + rng.randrange(2), number, tries=7)
    if rng.random() < 0.3:  # the shop's own retry after it lost our answer
        again = await shop.create_order(1, 1, number, tries=7)
        assert again.status in (0, answer.status)
        if again.status and answer.status:
            assert again.body == answer.body
    if answer.status != 200:
        return number, None
    return number, int(answer.json()["order_id"])


@pytest.mark.slow
async def test_daemon_killed_three_times_hands_each_order_the_same_keys(
    tmp_path: Path, eneba: FakeEneba, shop: FakeShop
) -> None:
    rng = random.Random(29)
    port = free_port()
    eneba.callback_url = f"http://127.0.0.1:{port}/eneba/eneba"
    shop.upstream_url = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path, port, eneba, shop)
    log = tmp_path / "daemon.log"
    db = tmp_path / "kami.db"
    game = await import_stock(
        config,
        SECRETS,
        tmp_path,
        "GAME-100",
        [f"G-{i:04d}-{rng.getrandbits(40):010x}" for i in range(400)],
    )
    vip = await import_stock(
        config,
        SECRETS,
        tmp_path,
        "VIP-30D",
        [f"V-{i:04d}-{rng.getrandbits(40):010x}" for i in range(60)],
    )
    flows: list[asyncio.Task[Any]] = []
    shop_flows: list[asyncio.Task[tuple[str, int | None]]] = []
    kills = 0
    proc = await start_daemon(config, SECRETS, log)
    await listening(port, time.monotonic() + 30)
    for round_no in range(4):
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            n = len(flows)
            flows.append(asyncio.create_task(eneba_order(eneba, n, random.Random(n))))
            if n % 2 == 0:
                shop_flows.append(asyncio.create_task(shop_order(shop, n, random.Random(1000 + n))))
            await asyncio.sleep(rng.uniform(0.02, 0.12))
        if round_no == 3:
            break
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        kills += 1
        proc = await start_daemon(config, SECRETS, log)
    await asyncio.gather(*flows)
    shop_results = await asyncio.gather(*shop_flows)
    # Unpaid reservations (a RESERVE whose answer was lost in a kill) run out; provisions
    # are confirmed from P_declaredStockResult; the shop's callbacks all arrive.
    deadline = time.monotonic() + 120  # a hang guard only
    while True:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            states = dict(conn.execute("SELECT state, COUNT(*) FROM orders GROUP BY state"))
        created = {number for number, order_id in shop_results if order_id is not None}
        called = {c.downstream_order_no for c in shop.callbacks}
        if not {"reserved", "provided"} & set(states) and created <= called:
            break
        assert proc.returncode is None, f"daemon died, see {log}"
        assert time.monotonic() < deadline, (
            f"not settled: {states}, {len(created - called)} callbacks owed"
        )
        await asyncio.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0, "graceful stop failed"

    figures = Counter[str]()
    owner: dict[str, str] = {}  # every key handed to an order, and its order
    kept: set[str] = set()  # of those, the keys the order kept (not cancelled afterwards)
    store = SQLiteStore(db, master_key_for_tests())
    await store.open()
    try:
        # --- Eneba: every successful PROVIDE attempt carried the same bytes, the keys bound.
        for order in eneba.orders.values():
            figures["eneba orders"] += 1
            attempts = order.calls.get(PROVISION, [])
            figures["provide attempts"] += len(attempts)
            figures["provide attempts failed"] += sum(a.status != 200 for a in attempts)
            answered = {a.body for a in attempts if a.status == 200}
            if attempts and attempts[0].status != 200 and answered:
                figures["provides answered after a failed attempt"] += 1
            assert len(answered) <= 1, f"{order.order_id} got two different PROVIDE replies"
            lines = await store.find_lines(order.order_id)
            if order.keys is None:
                continue
            figures["eneba orders with keys"] += 1
            got = sorted(k for keys in order.keys.values() for k in keys)
            for k in got:
                assert owner.setdefault(k, order.order_id) == order.order_id, f"{k} on two orders"
            cancelled_after = order.results.get("DECLARED_STOCK_CANCELLATION") == "COMPLETED"
            if cancelled_after:
                figures["cancelled after provide"] += 1
                assert all(line.state == LineState.CANCELLED for line in lines)
                continue
            bound = sorted([i.secret for line in lines for i in await store.bound_items(line.id)])
            assert got == bound, order.order_id
            kept.update(got)
            assert all(line.state == LineState.DELIVERED for line in lines), order.order_id
        # --- dujiao-next: the callback and the polled order carry the keys bound.
        for number, order_id in shop_results:
            if order_id is None:
                figures["shop orders without an answer"] += 1
                continue
            figures["shop orders"] += 1
            [line] = await store.find_lines(number)
            bound = [i.secret for i in await store.bound_items(line.id)]
            sent = [c.body for c in shop.callbacks if c.downstream_order_no == number]
            assert sent, number
            for body in sent:
                shown = [row.split(" ")[-1] for row in body["fulfillment"]["payload"].split("\n")]
                assert shown == bound, number
            for k in bound:
                assert owner.setdefault(k, number) == number, f"{k} on two orders"
            kept.update(bound)
        figures["callback attempts"] = shop.callback_attempts
        figures["kills"] = kills
        # --- No reservation keeps stock: every key is free, handed to an order that kept
        # it, void after a cancel that came once its keys were out, or parked with a reason.
        counts = {c.sku: c for c in await store.stock_counts()}
        handed = len(kept)
        voided = counts["GAME-100"].void + counts["VIP-30D"].void
        parked = [line for line in await store.list_lines(LineState.NEEDS_ATTENTION, 1000)]
        parked_keys = 0
        for line in parked:
            parked_keys += len(await store.bound_items(line.id))
        free = counts["GAME-100"].free + counts["VIP-30D"].free
        assert free + handed + voided + parked_keys == len(game) + len(vip), (figures, parked)
        exported = {i.secret for i in await store.export_keys("GAME-100", KeyState.FREE)}
        assert not exported & set(owner), "a key handed out is back in stock"
        figures["parked"] = len(parked)
    finally:
        await store.close()
    text = log.read_text(encoding="utf-8")
    for secret in (TOKEN, AUTH_SECRET, DJ_SECRET, *list(owner)[:50]):
        assert secret not in text, "a secret or a key in the log"
    for line in text.splitlines():
        if line.startswith("{") and "listener_request" in line:
            json.loads(line)
    print("\nresponder daemon figures:", dict(figures))
    assert kills == 3 and figures["eneba orders with keys"] > 10 and figures["shop orders"] > 5

"""The WooCommerce adapter against the doc-built fake shop (tests/fakes/woocommerce.py): auth,
the listing passes and their cursor, delivery notes that are never sent twice, orders the shop
closes meanwhile; then the real engine in-process, and the real daemon killed three times."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.config import ConfigError, PlatformSettings, parse_config
from agent.domain import (
    Ambiguous,
    AuthFailed,
    CardItem,
    LineState,
    OrderClosed,
    Permanent,
    Transient,
)
from agent.platforms.woocommerce import WooCommerceOptions, WooCommercePlatform
from agent.runtime import platform_connections, run_engine
from agent.signed_http import Redirected
from agent.store.base import Store
from agent.store.sqlite import SQLiteStore
from tests.conftest import make_config, master_key_for_tests, stock
from tests.daemon import import_stock, kill_after, start_daemon
from tests.fakes.woocommerce import FakeWooCommerce
from tests.helpers import wait_for

SECRET_NAME = "platform.main.secret"


@pytest.fixture
async def shop() -> AsyncIterator[FakeWooCommerce]:
    fake = FakeWooCommerce(seed=3)
    await fake.start()
    yield fake
    await fake.stop()


def woo_settings(shop: FakeWooCommerce, **overrides: Any) -> PlatformSettings:
    values: dict[str, Any] = {
        "name": "main",
        "kind": "woocommerce",
        "base_url": shop.base_url,
        "api_key": shop.consumer_key,
        "secret_name": SECRET_NAME,
        "timeout": 2.0,
        "page_size": 50,
        "options": WooCommerceOptions(),
    }
    values.update(overrides)
    return PlatformSettings(**values)


@asynccontextmanager
async def adapter(
    shop: FakeWooCommerce, secret: str | None = None, **overrides: Any
) -> AsyncIterator[WooCommercePlatform]:
    platform = WooCommercePlatform(
        woo_settings(shop, **overrides), shop.consumer_secret if secret is None else secret
    )
    try:
        yield platform
    finally:
        await platform.close()


async def one_pass(platform: WooCommercePlatform, cursor: str | None) -> tuple[list[str], str]:
    """A listing pass as the engine runs one: pages until has_more is off."""
    seen: list[str] = []
    while True:
        page = await platform.list_paid(cursor)
        seen += [o.order_id for o in page.orders]
        assert page.next_cursor
        cursor = page.next_cursor
        if not page.has_more:
            return seen, cursor


def keys_for(tag: str, count: int) -> list[CardItem]:
    return [
        CardItem(code="", secret=f"{tag}-{i}-{random.getrandbits(40):010x}") for i in range(count)
    ]


def line_of(shop: FakeWooCommerce, order_id: int, index: int = 0) -> str:
    return f"{order_id}/{shop.orders[order_id].lines[index].id}"


# --- configuration ------------------------------------------------------------------------


def _config(platform: dict[str, Any]) -> dict[str, Any]:
    base = {
        "kind": "woocommerce",
        "base_url": "https://shop.example.com",
        "api_key": "ck_1",
        "secret": SECRET_NAME,
    }
    return {"store": {"path": "kami.db"}, "platforms": {"main": {**base, **platform}}}


def test_config_reads_the_woocommerce_keys(tmp_path: Path) -> None:
    config = parse_config(
        _config({"listing_margin": 120, "complete_orders": False}), tmp_path / "c.toml"
    )
    assert config.platforms[0].options == WooCommerceOptions(
        listing_margin=120.0, complete_orders=False
    )
    loopback = parse_config(_config({"base_url": "http://127.0.0.1:8080"}), tmp_path / "c.toml")
    assert loopback.platforms[0].base_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ({"base_url": "http://shop.example.com"}, "must be https://"),
        ({"long_poll": True}, "no long poll"),
        ({"page_size": 200}, "at most 100"),
        ({"listing_margin": 0}, "listing_margin"),
        ({"complete_order": True}, "not a known setting"),
    ],
)
def test_config_refuses_what_woocommerce_cannot_do(
    tmp_path: Path, setting: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_config(_config(setting), tmp_path / "c.toml")


# --- auth, transport ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ssl", "wrong_secret", "how"),
    [
        (True, "Consumer secret is invalid", "basic"),
        (False, "provided signature does not match", "oauth"),
    ],
)
async def test_wrong_credentials_are_auth_failures_that_do_not_show_the_secret(
    shop: FakeWooCommerce, ssl: bool, wrong_secret: str, how: str
) -> None:
    shop.ssl = ssl
    shop.add_order([("GAME-100", 1)])
    async with adapter(shop, secret="cs_wrong_secret_value") as platform:
        with pytest.raises(AuthFailed) as refused:
            await platform.list_paid(None)
    assert wrong_secret in str(refused.value)
    assert "cs_wrong_secret_value" not in str(refused.value)
    async with adapter(shop, api_key="ck_unknown") as platform:
        with pytest.raises(AuthFailed, match="Consumer key is invalid"):
            await platform.ping()
    async with adapter(shop) as platform:
        await platform.ping()
    # Never the query-string credentials: the secret never travels in a URL.
    assert shop.seen_auth == {how}
    assert shop.auth_failures == 2


async def test_a_plain_http_shop_is_signed_with_oauth_and_never_sees_the_secret(
    shop: FakeWooCommerce,
) -> None:
    # WooCommerce reads Basic auth only when WordPress believes the request is on TLS; over
    # plain HTTP (a shop on the same machine) it checks an OAuth 1.0a signature instead
    # [docs _authentication.md; class-wc-rest-authentication.php]. Basic alone is refused.
    order = shop.add_order([("GAME-100", 1), ("GAME-200", 2)])
    async with adapter(shop) as platform:
        seen_lines, _ = await one_pass(platform, None)
        assert len(seen_lines) == 2
        await platform.deliver(line_of(shop, order), "idem-1", keys_for("A", 1), "Thanks")
        await platform.deliver(line_of(shop, order, 1), "idem-2", keys_for("B", 2), "Thanks")
    assert shop.orders[order].status == "completed"
    assert shop.auth_failures == 0 and shop.seen_auth == {"oauth"}
    seen = shop.seen_queries
    assert seen and all("oauth_signature=" in q for q in seen)
    assert not any(shop.consumer_secret in q for q in seen)
    # A fresh nonce for every request (WooCommerce refuses one used in the last 15 minutes).
    assert len(shop.used_nonces) == len(seen)


async def test_rate_limit_is_transient_with_the_shops_retry_after(shop: FakeWooCommerce) -> None:
    shop.faults.rate_limit_rate = 1.0
    async with adapter(shop) as platform:
        with pytest.raises(Transient) as limited:
            await platform.list_paid(None)
    assert limited.value.retry_after == 1.0
    assert shop.requests == 1  # waited for, not hammered within the call


async def test_a_redirect_is_refused_and_named(tmp_path: Path) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("https://elsewhere.example/collect?token=abc")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake = FakeWooCommerce()
    fake.base_url = f"http://127.0.0.1:{port}"
    try:
        async with adapter(fake) as platform:
            with pytest.raises(Redirected, match=r"elsewhere\.example"):
                await platform.list_paid(None)
            with pytest.raises(Redirected):
                await platform.deliver(
                    "700/300", "kami-x-0", [CardItem("", "SECRET-KEY-1")], "Thanks"
                )
    finally:
        await runner.cleanup()


# --- listing ------------------------------------------------------------------------------


async def test_a_pass_reads_every_page_the_shop_announces(shop: FakeWooCommerce) -> None:
    ids = [shop.add_order([("GAME-100", 1)]) for _ in range(230)]
    async with adapter(shop) as platform:
        seen, _ = await one_pass(platform, None)
    assert set(seen) == {line_of(shop, i) for i in ids}
    # page 1 to learn X-WP-TotalPages (5), then 5, 4, 3, 2, 1
    assert shop.listings == 6


async def test_orders_completed_during_a_pass_do_not_make_others_skipped(
    shop: FakeWooCommerce,
) -> None:
    """Each page's orders leave `processing` as soon as it is read (as the workers deliver
    them): read forwards, the next page would start five orders too late every time."""
    ids = [shop.add_order([("GAME-100", 1)]) for _ in range(230)]
    seen: list[str] = []
    async with adapter(shop) as platform:
        cursor: str | None = None
        while True:
            page = await platform.list_paid(cursor)
            for order in page.orders:
                seen.append(order.order_id)
                shop.shop_set_status(int(order.order_id.split("/")[0]), "completed")
            cursor = page.next_cursor
            if not page.has_more:
                break
    assert set(seen) == {line_of(shop, i) for i in ids}


async def test_cursor_resumes_after_a_restart_and_keeps_orders_of_a_shared_second() -> None:
    now = [1_800_000_000.0]
    shop = FakeWooCommerce(clock=lambda: now[0])
    shop.ssl = True  # Basic auth: OAuth timestamps would be checked against the shifted clock
    await shop.start()
    try:
        first = [shop.add_order([("GAME-100", 1)]) for _ in range(120)]
        async with adapter(shop) as platform:  # reads one page, then the process dies
            page = await platform.list_paid(None)
        assert page.has_more and page.next_cursor
        async with adapter(shop) as platform:  # restarted with the stored cursor
            rest, cursor = await one_pass(platform, page.next_cursor)
        assert {o.order_id for o in page.orders} | set(rest) == {line_of(shop, i) for i in first}
        # New orders in the very second the pass began: listed by the next pass.
        same_second = [shop.add_order([("VIP-30D", 1)]) for _ in range(3)]
        async with adapter(shop) as platform:
            again, cursor = await one_pass(platform, cursor)
        assert {line_of(shop, i) for i in same_second} <= set(again)
        # Later, a pass lists what changed since, not the whole shop.
        now[0] += 600
        later = shop.add_order([("GAME-100", 2)])
        async with adapter(shop) as platform:
            catching_up, cursor = await one_pass(platform, cursor)
            now[0] += 120
            since, cursor = await one_pass(platform, cursor)
            quiet, _ = await one_pass(platform, cursor)
            everything, _ = await one_pass(platform, None)
        assert line_of(shop, later) in catching_up
        # Each pass lists what changed since the one before began (less the margin) ...
        assert set(since) == {line_of(shop, later)}
        assert quiet == []
        assert len(set(everything)) == 124  # the full re-list: every processing order
    finally:
        await shop.stop()


async def test_line_items_become_lines_and_those_without_a_sku_are_left_to_the_shop(
    shop: FakeWooCommerce,
) -> None:
    mixed = shop.add_order([("GAME-100", 2), ("", 1), ("VIP-30D", 1)])
    shop.add_order([("GAME-100", 1)], status="pending")  # not paid
    shop.add_order([("GAME-100", 1)], status="on-hold")
    async with adapter(shop) as platform:
        page = await platform.list_paid(None)
    assert [(o.order_id, o.sku, o.quantity, o.status) for o in page.orders] == [  # type: ignore[union-attr]
        (line_of(shop, mixed, 0), "GAME-100", 2, "paid"),
        (line_of(shop, mixed, 2), "VIP-30D", 1, "paid"),
    ]
    assert page.orders[0].buyer_contact == f"buyer{mixed}@example.test"  # type: ignore[union-attr]


# --- delivery -----------------------------------------------------------------------------


async def test_a_delivery_is_one_note_however_often_it_is_sent(shop: FakeWooCommerce) -> None:
    order = shop.add_order([("GAME-100", 2)])
    line = line_of(shop, order)
    items = keys_for("K", 2)
    async with adapter(shop) as platform:
        for _ in range(3):
            await platform.deliver(line, "kami-abc-0", items, "Thank you!")
        remote = await platform.get_order(line)
    assert shop.notes_naming(order, "GAME-100") == 1
    assert all(item.secret in shop.customer_notes(order)[0].note for item in items)
    assert shop.orders[order].status == "completed"
    assert remote.status == "delivered" and remote.items == tuple(items)


async def test_a_lost_answer_after_the_note_is_reconciled_without_a_second_note(
    shop: FakeWooCommerce,
) -> None:
    order = shop.add_order([("GAME-100", 1)])
    line = line_of(shop, order)
    items = keys_for("L", 1)
    async with adapter(shop) as platform:
        shop.faults.drop_after_commit_rate = 1.0
        with pytest.raises(Ambiguous):
            await platform.deliver(line, "kami-lost-0", items, "Thanks")
        shop.faults.drop_after_commit_rate = 0.0
        assert shop.dropped == 1 and shop.orders[order].status == "processing"
        # What the engine does next: ask, then (were it still "paid") send again.
        remote = await platform.get_order(line)
        await platform.deliver(line, "kami-lost-0", items, "Thanks")
    assert remote.status == "delivered" and remote.items == tuple(items)
    assert len(shop.customer_notes(order)) == 1
    assert shop.orders[order].status == "completed"  # finished by the reconciliation


async def test_keys_come_back_exactly_as_sent(shop: FakeWooCommerce) -> None:
    order = shop.add_order([("GAME-100", 3)])
    line = line_of(shop, order)
    items = [
        CardItem("NO--1", 'AB--CD "quoted" ...'),
        CardItem("", "x<y>&z \\ back\\slash"),
        CardItem("卡号", "密钥-Ü-\t-end "),
    ]
    async with adapter(shop) as platform:
        await platform.deliver(line, "kami-odd-0", items, "Merci")
        remote = await platform.get_order(line)
    assert remote.items == tuple(items)
    assert "\\" not in shop.customer_notes(order)[0].note  # WordPress would unslash it
    with pytest.raises(Permanent, match="line break"):
        async with adapter(shop) as platform:
            await platform.deliver(line, "kami-odd-1", [CardItem("", "a\nb")], "x")


@pytest.mark.parametrize(
    ("status", "closed"),
    [("refunded", "refunded"), ("cancelled", "cancelled"), ("completed", "cancelled")],
)
async def test_an_order_the_shop_closed_meanwhile_is_closed_not_delivered(
    shop: FakeWooCommerce, status: str, closed: str
) -> None:
    order = shop.add_order([("GAME-100", 1)])
    line = line_of(shop, order)
    shop.shop_set_status(order, status)
    async with adapter(shop) as platform:
        with pytest.raises(OrderClosed) as refused:
            await platform.deliver(line, "kami-c-0", keys_for("C", 1), "Thanks")
        remote = await platform.get_order(line)
    assert refused.value.status == closed and remote.status == closed
    if status == "completed":
        assert "without our delivery note" in str(refused.value)
    assert shop.customer_notes(order) == []
    assert shop.orders[order].status == status


async def test_a_refund_landing_after_the_note_is_not_overwritten(shop: FakeWooCommerce) -> None:
    order = shop.add_order([("GAME-100", 1)])
    line = line_of(shop, order)
    items = keys_for("R", 1)
    # read order, read notes, post the note, then the shop refunds
    shop.schedule_refund(order, after_touches=3)
    async with adapter(shop) as platform:
        await platform.deliver(line, "kami-r-0", items, "Thanks")
        remote = await platform.get_order(line)
    assert remote.status == "delivered"  # the keys reached the buyer before the refund
    assert shop.orders[order].status == "refunded"
    assert len(shop.customer_notes(order)) == 1


async def test_an_order_of_several_lines_completes_after_the_last_one(
    shop: FakeWooCommerce,
) -> None:
    order = shop.add_order([("GAME-100", 1), ("VIP-30D", 2)])
    first, second = line_of(shop, order, 0), line_of(shop, order, 1)
    async with adapter(shop) as platform:
        await platform.deliver(first, "kami-m1-0", keys_for("M", 1), "Thanks")
        assert shop.orders[order].status == "processing"
        assert (await platform.get_order(second)).status == "paid"
        await platform.deliver(second, "kami-m2-0", keys_for("N", 2), "Thanks")
        assert shop.orders[order].status == "completed"
        # Both lines at once: whichever finishes last sees both notes and completes it.
        both = shop.add_order([("GAME-100", 1), ("VIP-30D", 1)])
        await asyncio.gather(
            platform.deliver(line_of(shop, both, 0), "kami-b1-0", keys_for("B", 1), "x"),
            platform.deliver(line_of(shop, both, 1), "kami-b2-0", keys_for("D", 1), "x"),
        )
    assert shop.orders[both].status == "completed"
    assert shop.notes_naming(order, "GAME-100") == shop.notes_naming(order, "VIP-30D") == 1


async def test_an_order_with_a_product_without_sku_is_left_for_the_shop_to_complete(
    shop: FakeWooCommerce,
) -> None:
    order = shop.add_order([("GAME-100", 1), ("", 1)])
    async with adapter(shop) as platform:
        await platform.deliver(line_of(shop, order), "kami-p-0", keys_for("P", 1), "Thanks")
    assert shop.orders[order].status == "processing"
    assert len(shop.customer_notes(order)) == 1


async def test_an_order_on_hold_is_not_delivered(shop: FakeWooCommerce) -> None:
    order = shop.add_order([("GAME-100", 1)], status="on-hold")
    async with adapter(shop) as platform:
        with pytest.raises(Permanent, match="on-hold"):
            await platform.deliver(line_of(shop, order), "kami-h-0", keys_for("H", 1), "x")
        assert (await platform.get_order(line_of(shop, order))).status == "on-hold"
    assert shop.customer_notes(order) == []


# --- end to end ---------------------------------------------------------------------------

KEY_RE = re.compile(r"^Key \d+: <code>([^<]*)</code>$", re.MULTILINE)


@dataclasses.dataclass
class Figures:
    orders: int
    lines: int
    delivered: int
    closed: int
    buyer_duplicates: int
    refunds_scheduled: int
    faults: dict[str, int]


def shop_orders(shop: FakeWooCommerce, count: int, rng: random.Random) -> tuple[list[int], int]:
    """`count` paid orders, a quarter of them with two line items; about one in twelve is
    refunded by the shop at some point of its delivery. Returns the ids and the refunds."""
    ids, refunds = [], 0
    for _ in range(count):
        items = [("GAME-100", rng.randint(1, 3))]
        if rng.random() < 0.25:
            items.append(("VIP-30D", rng.randint(1, 2)))
        order = shop.add_order(items)
        if rng.random() < 0.08:
            shop.schedule_refund(order, after_touches=rng.randint(0, 6))
            refunds += 1
        ids.append(order)
    return ids, refunds


def refunds_overwritten(shop: FakeWooCommerce, ids: list[int]) -> int:
    """Orders the shop refunded that we then set completed: the refund landed between our
    last read and our PUT (WooCommerce has no conditional update; see the docs page)."""
    return sum(
        1 for i in ids if any("from Refunded to Completed" in n.note for n in shop.orders[i].notes)
    )


def faulty(shop: FakeWooCommerce) -> None:
    shop.faults.error_rate = 0.05
    shop.faults.rate_limit_rate = 0.03
    shop.faults.drop_after_commit_rate = 0.1
    shop.faults.duplicate_rate = 0.1


async def ledger_lines(store: Store) -> dict[str, tuple[LineState, tuple[str, ...]]]:
    lines = await store.list_lines(None, 100_000)
    return {
        line.order_id: (line.state, tuple(i.secret for i in await store.bound_items(line.id)))
        for line in lines
    }


def check_buyer_view(
    shop: FakeWooCommerce, ids: list[int], ledger: dict[str, tuple[LineState, tuple[str, ...]]]
) -> tuple[int, int, int]:
    """Every line item got exactly one note with its keys if the ledger says delivered, none if
    it was closed; no key in two notes. Returns (delivered, closed, duplicates as the buyer sees
    them)."""
    delivered = closed = duplicates = 0
    note_keys: Counter[str] = Counter()
    for order_id in ids:
        order = shop.orders[order_id]
        for note in shop.customer_notes(order_id):
            note_keys.update(KEY_RE.findall(note.note))
        for item in order.lines:
            state, secrets = ledger[f"{order_id}/{item.id}"]
            notes = [n.note for n in shop.customer_notes(order_id) if item.sku in n.note]
            duplicates += max(0, len(notes) - 1)
            if state == LineState.DELIVERED:
                delivered += 1
                assert len(notes) == 1, (order_id, item.sku, len(notes))
                assert len(secrets) == item.quantity == len(set(secrets))
                assert sorted(KEY_RE.findall(notes[0])) == sorted(secrets)
            else:
                assert state in (LineState.REFUNDED, LineState.CANCELLED), (order_id, state)
                assert notes == [], (order_id, state)
                closed += 1
        if (
            all(ledger[f"{order_id}/{i.id}"][0] == LineState.DELIVERED for i in order.lines)
            and order.refund_after_touches is None
            and order.status != "refunded"
        ):
            assert order.status == "completed", (order_id, order.status)
    assert not [k for k, n in note_keys.items() if n > 1], "a key went out twice"
    assert duplicates == 0
    return delivered, closed, duplicates


async def test_engine_delivers_every_line_once_as_the_buyer_sees_it(
    tmp_path: Path, sqlite_store: Store
) -> None:
    rng = random.Random(15)
    shop = FakeWooCommerce(seed=15)
    await shop.start()
    faulty(shop)
    ids, refunds = shop_orders(shop, 300, rng)
    lines = sum(len(shop.orders[i].lines) for i in ids)
    await stock(sqlite_store, "GAME-100", 1000)
    await stock(sqlite_store, "VIP-30D", 400)
    config = make_config(tmp_path, shop.base_url, reconcile_interval=1.0)
    settings = woo_settings(shop, page_size=40)
    config = dataclasses.replace(config, platforms=(settings,))
    platform = WooCommercePlatform(
        settings, shop.consumer_secret, platform_connections(config.agent)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_engine(config, sqlite_store, {"main": platform}, stop))

    async def settled() -> bool:
        counts = await sqlite_store.count_by_state()
        done = sum(
            counts.get(s, 0) for s in (LineState.DELIVERED, LineState.REFUNDED, LineState.CANCELLED)
        )
        return done == lines and sum(counts.values()) == lines

    try:
        await wait_for(settled, "every line delivered or closed")
        # Completions that failed thrice are finished by the re-list's check of the order.
        await wait_for(
            lambda: all(shop.orders[i].status in ("completed", "refunded") for i in ids),
            "orders completed",
        )
    finally:
        stop.set()
        await task
        await platform.close()
        await shop.stop()
    delivered, closed, duplicates = check_buyer_view(shop, ids, await ledger_lines(sqlite_store))
    assert delivered + closed == lines and closed > 0
    assert shop.dropped > 0 and shop.errors > 0 and shop.rate_limited > 0 and shop.duplicated > 0
    print(
        f"\nwoocommerce in-process: {len(ids)} orders, {lines} lines, {delivered} delivered,"
        f" {closed} closed by refunds ({refunds} refunds scheduled); faults: {shop.errors} 5xx,"
        f" {shop.rate_limited} 429, {shop.dropped} lost answers, {shop.duplicated} duplicate"
        f" listings; duplicates as the buyer sees them: {duplicates}; refunds then completed"
        f" by us: {refunds_overwritten(shop, ids)}"
    )


# --- the real daemon, killed ----------------------------------------------------------------

DAEMON_ORDERS = 1000  # as the crash test: 1,000 orders, faults, 3 kills


def daemon_config(tmp_path: Path, shop: FakeWooCommerce) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[agent]
poll_interval = 0.1
sweep_interval = 0.1
reconcile_interval = 2.0
concurrency = 8
retry_base = 0.05
retry_cap = 0.5

[store]
path = "kami.db"

[platforms.main]
kind = "woocommerce"
base_url = "{shop.base_url}"
api_key = "{shop.consumer_key}"
secret = "{SECRET_NAME}"
timeout = 2.0
page_size = 50

[skus."GAME-100"]
max_quantity = 5

[skus."VIP-30D"]
max_quantity = 5
""",
        encoding="utf-8",
    )
    return path


def ledger_settled(db: Path, lines: int) -> bool:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        states: dict[str, int] = dict(
            conn.execute("SELECT state, COUNT(*) FROM orders GROUP BY state")
        )
    done = sum(states.get(s, 0) for s in ("delivered", "refunded", "cancelled"))
    return done == lines == sum(states.values())


@pytest.mark.slow
async def test_daemon_killed_three_times_delivers_every_line_once(tmp_path: Path) -> None:
    rng = random.Random(1515)
    shop = FakeWooCommerce(
        consumer_key="ck_daemon_0000000000000000000000000000000",
        consumer_secret="cs_daemon_secret_9f8e7d6c5b4a39281706",
        seed=1515,
    )
    await shop.start()
    faulty(shop)
    daemon_secrets = {"KAMI_SECRET_PLATFORM_MAIN_SECRET": shop.consumer_secret}
    config = daemon_config(tmp_path, shop)
    log = tmp_path / "daemon.log"
    db = tmp_path / "kami.db"
    kills: list[str] = []
    ids: list[int] = []
    refunds = 0
    try:
        for sku, count in (("GAME-100", 3500), ("VIP-30D", 1200)):
            values = [f"{sku}-{i:05d}-{rng.getrandbits(48):012x}" for i in range(count)]
            await import_stock(config, daemon_secrets, tmp_path, sku, values)
        # Three runs killed while orders stream in: at the worst moment (the note went out,
        # the ledger does not know yet), at a random moment, right after an intent.
        for crash_at, budget in (
            ("after_deliver_call:25", 6.0),
            (None, 1.5),
            ("after_intent:40", 6.0),
        ):
            more, scheduled = shop_orders(shop, DAEMON_ORDERS // 4, rng)
            ids += more
            refunds += scheduled
            proc = await start_daemon(config, daemon_secrets, log, crash_at)
            code, by_itself = await kill_after(proc, budget)
            assert code == -signal.SIGKILL, f"daemon exited with {code}, see {log}"
            kills.append(crash_at.split(":")[0] if by_itself and crash_at else "random")
        more, scheduled = shop_orders(shop, DAEMON_ORDERS - len(ids), rng)
        ids += more
        refunds += scheduled
        lines = sum(len(shop.orders[i].lines) for i in ids)
        proc = await start_daemon(config, daemon_secrets, log)
        deadline = time.monotonic() + 180.0  # hang guard only
        while not (
            ledger_settled(db, lines)
            and all(shop.orders[i].status in ("completed", "refunded") for i in ids)
        ):
            assert proc.returncode is None, f"daemon died, see {log}"
            assert time.monotonic() < deadline, f"not settled in time, see {log}"
            await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "graceful stop failed"
    finally:
        await shop.stop()

    store = SQLiteStore(db, master_key_for_tests())
    await store.open()
    try:
        ledger = await ledger_lines(store)
    finally:
        await store.close()
    delivered, closed, duplicates = check_buyer_view(shop, ids, ledger)
    assert delivered + closed == lines
    assert len(kills) == 3
    text = log.read_text(encoding="utf-8", errors="replace")
    assert shop.consumer_secret not in text
    assert "Basic " not in text
    assert not [s for _, secrets in ledger.values() for s in secrets if s in text]
    print(
        f"\nwoocommerce daemon: {len(ids)} orders, {lines} lines, {delivered} delivered,"
        f" {closed} closed by refunds ({refunds} scheduled); kills: {kills}; faults:"
        f" {shop.errors} 5xx, {shop.rate_limited} 429, {shop.dropped} lost answers,"
        f" {shop.duplicated} duplicate listings; duplicates as the buyer sees them: {duplicates};"
        f" refunds then completed by us: {refunds_overwritten(shop, ids)}"
    )

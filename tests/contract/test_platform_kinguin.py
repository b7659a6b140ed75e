"""The Kinguin adapter against the doc-built fake (tests/fakes/kinguin.py) on loopback: tokens,
paging, every way an upload can end, rate limits, declared stock; then the real engine
in-process with faults, and the real daemon killed three times."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import random
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import pytest
from aiohttp import web

from agent import logs
from agent.alerts import AlertEvaluator
from agent.config import Config, ConfigError, PlatformSettings, load_config, parse_config
from agent.domain import (
    ACTIVE_STATES,
    Ambiguous,
    AuthFailed,
    CardItem,
    DeliveryConflict,
    LineState,
    OrderClosed,
    OrderLine,
    Permanent,
    PlatformOrder,
    RejectedOrder,
    Transient,
)
from agent.platforms import KINDS, kind_module
from agent.platforms.kinguin import (
    MAX_WRITES,
    KinguinOptions,
    KinguinPlatform,
)
from agent.platforms.ratelimit import BURST_SHARE, TokenBucket
from agent.runtime import run_engine
from agent.store.base import Store
from agent.store.sqlite import SQLiteStore
from tests.conftest import make_config, master_key_for_tests, open_test_store
from tests.daemon import import_stock, kill_after, run_cli, start_daemon
from tests.fakes.kinguin import FakeKinguin, ShiftedClock
from tests.helpers import wait_for

CLIENT_ID = "kami-test-client"
CLIENT_SECRET = "kinguin-client-secret-for-tests"
OFFER_GAME = "5f7efd272f3a650001f42722"
OFFER_GAME_2 = "5f7efd272f3a650001f42723"  # a second offer of the same SKU
OFFER_VIP = "660691850f65d000010da229"
OFFER_UNMAPPED = "660691850f65d000010dffff"
OFFERS = {OFFER_GAME: "GAME-100", OFFER_GAME_2: "GAME-100", OFFER_VIP: "VIP-30D"}


def key(n: int, sku: str = "GAME-100") -> CardItem:
    return CardItem(code="", secret=f"{sku}-KEY-{n:05d}-XYZ")


@pytest.fixture
async def fake() -> AsyncIterator[FakeKinguin]:
    server = FakeKinguin(CLIENT_ID, CLIENT_SECRET, seed=7, clock=ShiftedClock())
    for offer in (OFFER_GAME, OFFER_GAME_2, OFFER_VIP, OFFER_UNMAPPED):
        server.add_offer(offer)
    await server.start()
    yield server
    await server.stop()


def kinguin_settings(fake: FakeKinguin, **overrides: Any) -> PlatformSettings:
    values: dict[str, Any] = {
        "name": "kg",
        "kind": "kinguin",
        "base_url": fake.base_url,
        "api_key": CLIENT_ID,
        "secret_name": "platform.kg.secret",
        "timeout": 2.0,
        "page_size": 50,
        "options": KinguinOptions(offers=OFFERS, token_url=f"{fake.base_url}/auth/token"),
    }
    values.update(overrides)
    return PlatformSettings(**values)


@pytest.fixture
async def adapter(fake: FakeKinguin) -> AsyncIterator[KinguinPlatform]:
    platform = KinguinPlatform(kinguin_settings(fake), CLIENT_SECRET, 8)
    yield platform
    await platform.close()


def clock_of(fake: FakeKinguin) -> ShiftedClock:
    assert isinstance(fake.clock, ShiftedClock)
    return fake.clock


async def all_pages(adapter: KinguinPlatform) -> list[PlatformOrder | RejectedOrder]:
    cursor, found = None, []
    for _ in range(100):
        page = await adapter.list_paid(cursor)
        found += page.orders
        cursor = page.next_cursor
        if not page.has_more:
            assert cursor == "page:0"  # the next listing starts over
            return found
    raise AssertionError("listing never ended")


# --- configuration ---------------------------------------------------------------------------
def kinguin_toml(**extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "kind": "kinguin",
        "base_url": "https://gateway.kinguin.net/sales-manager-api",
        "api_key": CLIENT_ID,
        "secret": "platform.kinguin.secret",
        "offers": dict(OFFERS),
    }
    section.update(extra)
    return {"store": {"path": "kami.db"}, "platforms": {"kinguin": section}}


def test_config_reads_kinguin_options(tmp_path: Path) -> None:
    assert "kinguin" in KINDS and kind_module("kinguin").parse_options is not None
    config = parse_config(kinguin_toml(writes_per_minute=1000), tmp_path / "c.toml")
    options = config.platforms[0].options
    assert isinstance(options, KinguinOptions)
    assert options.token_url == "https://id.kinguin.net/auth/token"
    assert options.offers == OFFERS and options.writes_per_minute == 1000
    assert options.skus["GAME-100"] == (OFFER_GAME, OFFER_GAME_2)


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        ({"offers": {}}, "offers: is required"),
        ({"writes_per_minute": MAX_WRITES + 1}, "writes_per_minute: must be between"),
        ({"offers": {"a/b": "GAME-100"}}, "not a Kinguin offer id"),
        ({"offers": {OFFER_GAME: ""}}, "must name a SKU"),
        ({"token_url": "ftp://id.kinguin.net"}, "token_url: must be an http(s) URL"),
        ({"token_url": "http://id.kinguin.net/auth/token"}, "token_url: must be an https://"),
        ({"base_url": "http://gateway.kinguin.net"}, "base_url: must be an https://"),
        ({"reservation_status": "BOUGHT"}, "reservation_status: is not a known setting"),
    ],
)
def test_config_rejects_bad_kinguin_options(
    tmp_path: Path, extra: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        parse_config(kinguin_toml(**extra), tmp_path / "c.toml")


# --- the token --------------------------------------------------------------------------------
async def test_token_is_cached_and_renewed_before_it_expires(fake: FakeKinguin) -> None:
    now = [1000.0]
    platform = KinguinPlatform(kinguin_settings(fake), CLIENT_SECRET, 4, monotonic=lambda: now[0])
    try:
        await platform.list_paid(None)
        await platform.list_paid(None)
        assert fake.token_requests == 1  # cached
        now[0] += 3600 - 300  # 5 minutes before expires_in=3600 runs out (renewal at 6 min)
        clock_of(fake).advance(3600 - 300)
        await platform.list_paid(None)
        assert fake.token_requests == 2
        assert fake.rejected_tokens == 0  # renewed before Kinguin would refuse it
    finally:
        await platform.close()


async def test_a_token_refused_with_401_is_renewed_once(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    await adapter.list_paid(None)
    clock_of(fake).advance(3601)  # Kinguin's clock says expired; ours does not know yet
    rid = fake.add_reservation(OFFER_GAME)
    page = await adapter.list_paid(None)
    assert [o.order_id for o in page.orders] == [f"{OFFER_GAME}/{rid}"]
    assert fake.rejected_tokens == 1 and fake.token_requests == 2


async def test_wrong_client_secret_is_auth_failed_without_the_secret(fake: FakeKinguin) -> None:
    platform = KinguinPlatform(kinguin_settings(fake), "not-the-secret-xyz", 4)
    try:
        with pytest.raises(AuthFailed) as caught:
            await platform.ping()
    finally:
        await platform.close()
    assert "not-the-secret-xyz" not in str(caught.value)


# --- intake -----------------------------------------------------------------------------------
async def test_listing_walks_the_pages_and_maps_offers_to_skus(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    wanted = {}
    for i in range(120):
        offer = OFFER_VIP if i % 3 == 0 else OFFER_GAME
        wanted[f"{offer}/{fake.add_reservation(offer)}"] = OFFERS[offer]
    fake.add_reservation(OFFER_GAME, status="DELIVERED")
    fake.add_reservation(OFFER_GAME, status="BUYING")  # not paid yet: not ours
    unmapped = fake.add_reservation(OFFER_UNMAPPED)
    found = await all_pages(adapter)
    orders = [o for o in found if isinstance(o, PlatformOrder)]
    assert {o.order_id: o.sku for o in orders} == wanted
    assert {(o.status, o.quantity, o.currency) for o in orders} == {("paid", 1, "EUR")}
    assert orders[0].amount == "19.90"
    res = fake.reservations[orders[0].order_id.split("/")[1]]
    assert orders[0].deliver_by is not None and orders[0].deliver_by.endswith("Z")
    from datetime import datetime

    due = datetime.fromisoformat(orders[0].deliver_by.replace("Z", "+00:00")).timestamp()
    assert abs(due - (res.updated + 900)) < 1.0  # 15 minutes after it needed stock
    [rejected] = [o for o in found if isinstance(o, RejectedOrder)]
    assert rejected.order_id == f"{OFFER_UNMAPPED}/{unmapped}"
    assert "unknown SKU" in rejected.reason and OFFER_UNMAPPED in rejected.reason


async def test_a_server_ignoring_filters_cannot_mislead_the_adapter(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    fake.faults.ignore_filters = True
    done = fake.add_reservation(OFFER_GAME)
    await adapter.deliver(f"{OFFER_GAME}/{done}", "kami-x-1", [key(1)], "")
    waiting = fake.add_reservation(OFFER_GAME)
    fake.add_reservation(OFFER_GAME, status="CANCELED")
    found = await all_pages(adapter)
    assert [o.order_id for o in found] == [f"{OFFER_GAME}/{waiting}"]
    # the stock read answers with every key of the offer: only this reservation's counts
    remote = await adapter.get_order(f"{OFFER_GAME}/{waiting}")
    assert remote.status == "paid" and remote.items == ()


async def test_no_long_poll(adapter: KinguinPlatform) -> None:
    with pytest.raises(Permanent, match="no long poll"):
        await adapter.wait_for_orders(None, 1.0)


# --- delivery ---------------------------------------------------------------------------------
async def test_delivery_uploads_one_key_to_its_reservation(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    rid = fake.add_reservation(OFFER_GAME)
    order_id = f"{OFFER_GAME}/{rid}"
    assert (await adapter.get_order(order_id)).status == "paid"
    item = CardItem(code="CARD-7", secret="SECRET-7")
    await adapter.deliver(order_id, "kami-abc-1", [item], "thanks")
    assert fake.keys_by_reservation() == {rid: ["CARD-7\nSECRET-7"]}
    assert fake.uploads[0].request_id == "kami-abc-1"
    remote = await adapter.get_order(order_id)
    assert remote.status == "delivered" and remote.items == (item,)


async def test_delivering_again_confirms_the_same_key_without_a_second_one(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    rid = fake.add_reservation(OFFER_GAME)
    await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-2", [key(1)], "")  # 409, then ours
    assert [u.outcome for u in fake.uploads] == ["delivered", "conflict"]
    assert fake.keys_by_reservation() == {rid: [key(1).secret]}


async def test_another_key_on_the_reservation_is_a_conflict(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    rid = fake.add_reservation(OFFER_GAME)
    await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    with pytest.raises(DeliveryConflict, match="another key"):
        await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-b-1", [key(2)], "")
    assert fake.keys_by_reservation() == {rid: [key(1).secret]}


async def test_a_response_lost_after_commit_is_confirmed_by_reading(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    fake.faults.drop_after_commit_rate = 1.0
    rid = fake.add_reservation(OFFER_GAME)
    await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    assert [u.outcome for u in fake.uploads] == ["dropped"]  # read, not uploaded again
    assert fake.keys_by_reservation() == {rid: [key(1).secret]}


async def test_a_5xx_with_nothing_stored_uploads_once_more(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    fake.faults.fail_uploads = 1
    rid = fake.add_reservation(OFFER_GAME)
    await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    assert [u.outcome for u in fake.uploads] == ["failed", "delivered"]
    fake.faults.fail_uploads = 2
    rid = fake.add_reservation(OFFER_GAME)
    with pytest.raises(Ambiguous, match="did not land"):  # never a third upload in one call
        await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-b-1", [key(2)], "")
    assert [u.outcome for u in fake.uploads][2:] == ["failed", "failed"]


async def test_a_reservation_cancelled_first_closes_the_order(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    rid = fake.add_reservation(OFFER_GAME)
    fake.cancel(rid)
    with pytest.raises(OrderClosed) as caught:
        await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    assert caught.value.status == "cancelled"
    assert fake.keys_by_reservation() == {}
    assert (await adapter.get_order(f"{OFFER_GAME}/{rid}")).status == "cancelled"


async def test_a_reservation_cancelled_mid_delivery_closes_the_order(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    fake.faults.cancel_on_upload_rate = 1.0
    rid = fake.add_reservation(OFFER_GAME)
    with pytest.raises(OrderClosed):
        await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    assert [u.outcome for u in fake.uploads] == ["invalid"]  # the 400, then only reads


async def test_kinguin_cancels_after_fifteen_minutes(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    late = fake.add_reservation(OFFER_GAME)
    clock_of(fake).advance(14 * 60)
    in_time = fake.add_reservation(OFFER_GAME)
    clock_of(fake).advance(61)
    with pytest.raises(OrderClosed):
        await adapter.deliver(f"{OFFER_GAME}/{late}", "kami-a-1", [key(1)], "")
    await adapter.deliver(f"{OFFER_GAME}/{in_time}", "kami-b-1", [key(2)], "")
    assert fake.keys_by_reservation() == {in_time: [key(2).secret]}


async def test_busy_reservation_is_ambiguous(fake: FakeKinguin, adapter: KinguinPlatform) -> None:
    fake.faults.busy_rate = 1.0
    rid = fake.add_reservation(OFFER_GAME)
    with pytest.raises(Ambiguous, match="busy"):
        await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    assert fake.keys_by_reservation() == {}


async def test_429_is_transient_with_retry_after(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    rid = fake.add_reservation(OFFER_GAME)
    fake.faults.rate_limit_rate = 1.0
    with pytest.raises(Transient) as caught:
        await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    assert caught.value.retry_after == 1.0
    with pytest.raises(Transient, match="rate limit"):
        await adapter.list_paid(None)
    fake.faults.rate_limit_rate = 0.0
    await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    assert fake.keys_by_reservation() == {rid: [key(1).secret]}


async def test_get_order_finds_archived_reservations(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    fake.archive_after = 60.0
    rid = fake.add_reservation(OFFER_GAME)
    await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    gone = fake.add_reservation(OFFER_GAME)
    fake.cancel(gone)
    clock_of(fake).advance(61)
    assert (await adapter.get_order(f"{OFFER_GAME}/{rid}")).items == (key(1),)
    assert (await adapter.get_order(f"{OFFER_GAME}/{gone}")).status == "cancelled"
    assert fake.reservations[gone].archived


async def test_more_than_one_key_for_a_reservation_is_refused(adapter: KinguinPlatform) -> None:
    with pytest.raises(Permanent, match="exactly one key"):
        await adapter.deliver(f"{OFFER_GAME}/r1", "kami-a-1", [key(1), key(2)], "")
    with pytest.raises(Permanent, match="not a Kinguin order id"):
        await adapter.get_order("no-slash")


async def test_a_redirect_is_refused_and_not_followed(fake: FakeKinguin) -> None:
    heard: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        heard.append(request.path)
        return web.json_response({"content": []})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{other_url}/api/v1/reservations")

    other, proxy = web.Application(), web.Application()
    other.router.add_route("*", "/{tail:.*}", elsewhere)
    proxy.router.add_route("*", "/{tail:.*}", redirect)
    runners = [web.AppRunner(app) for app in (other, proxy)]
    urls = []
    for runner in runners:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")  # type: ignore[union-attr]
    other_url, proxy_url = urls
    platform = KinguinPlatform(kinguin_settings(fake, base_url=proxy_url), CLIENT_SECRET, 4)
    try:
        with pytest.raises(Permanent, match=r"redirects to http://127\.0\.0\.1"):
            await platform.list_paid(None)
    finally:
        await platform.close()
        for runner in runners:
            await runner.cleanup()
    assert heard == []


# --- rate limits ------------------------------------------------------------------------------
async def test_token_bucket_keeps_every_minute_under_the_limit() -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds  # simulated time: the test never waits

    bucket = TokenBucket(MAX_WRITES, clock=lambda: now[0], sleep=sleep)
    sent = []
    for _ in range(3 * MAX_WRITES):
        await bucket.acquire()
        sent.append(now[0])
    # every 60-second window, wherever it starts, holds fewer than Kinguin's 2,000 writes
    start = 0
    for end, at in enumerate(sent):
        while sent[start] <= at - 60.0:
            start += 1
        assert end - start + 1 <= MAX_WRITES * (1 + BURST_SHARE) < 2000
    assert now[0] > 60.0  # it did have to wait


async def test_reads_and_writes_each_wait_for_their_own_bucket(fake: FakeKinguin) -> None:
    options = KinguinOptions(
        offers=OFFERS, token_url=f"{fake.base_url}/auth/token", reads_per_minute=60
    )
    frozen = 500.0  # the bucket never refills: its 3-request burst, then a wait each
    platform = KinguinPlatform(
        kinguin_settings(fake, options=options), CLIENT_SECRET, 4, monotonic=lambda: frozen
    )
    try:
        for _ in range(4):
            await platform.list_paid(None)
        rid = fake.add_reservation(OFFER_GAME)
        await platform.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    finally:
        await platform.close()
    assert platform._reads.waited == pytest.approx(1.0)  # one second at 60 a minute
    assert platform._writes.waited == 0.0  # the upload drew on the write bucket


# --- declared stock ---------------------------------------------------------------------------
async def test_publish_stock_declares_the_count_across_the_skus_offers(
    fake: FakeKinguin, adapter: KinguinPlatform
) -> None:
    await adapter.publish_stock("GAME-100", 5)
    declared = {o: fake.offers[o].declared_stock for o in (OFFER_GAME, OFFER_GAME_2)}
    assert declared == {OFFER_GAME: 3, OFFER_GAME_2: 2}  # never more than 5 in all
    assert fake.offers[OFFER_GAME].declared_text_stock == 3
    await adapter.publish_stock("GAME-100", 1)
    # the offer being lowered most is written first: the sum never exceeds the old one
    assert [p[0] for p in fake.patches[-2:]] == [OFFER_GAME, OFFER_GAME_2]
    assert fake.offers[OFFER_GAME].declared_stock + fake.offers[OFFER_GAME_2].declared_stock == 1
    await adapter.publish_stock("NOT-MAPPED", 9)  # nothing to publish
    fake.offers[OFFER_VIP].max_declared_stock = 3
    with pytest.raises(Permanent, match="Max declared stock has been exceeded"):
        await adapter.publish_stock("VIP-30D", 4)


# --- logs -------------------------------------------------------------------------------------
@pytest.fixture
def captured(quiet_logs: TextIO) -> Iterator[io.StringIO]:
    sink = io.StringIO()
    logs.configure("debug", sink)
    yield sink
    logs.configure("debug", quiet_logs)


async def test_no_token_secret_or_key_in_the_logs(
    fake: FakeKinguin, adapter: KinguinPlatform, captured: io.StringIO
) -> None:
    fake.faults.drop_after_commit_rate = 1.0
    rid = fake.add_reservation(OFFER_GAME)
    await adapter.deliver(f"{OFFER_GAME}/{rid}", "kami-a-1", [key(1)], "")
    clock_of(fake).advance(3601)
    await adapter.list_paid(None)  # a refused token and a new one
    text = captured.getvalue()
    assert "oauth_access_renewed" in text and "kinguin_token_refused" in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines
    assert CLIENT_SECRET not in text and key(1).secret not in text
    tokens = {t for t in fake._tokens}  # every token the fake ever issued
    assert len(tokens) == 2 and not any(t in text for t in tokens)


# --- the real engine, in-process ---------------------------------------------------------------
@asynccontextmanager
async def running_kinguin_agent(
    config: Config, store: Store, platform: KinguinPlatform
) -> AsyncIterator[None]:
    """tests.helpers.running_agent, with the Kinguin adapter as platform "main"."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_engine(config, store, {"main": platform}, stop))
    try:
        yield
    finally:
        stop.set()
        await task
        await platform.close()


def faulty(fake: FakeKinguin) -> None:
    """Everything the fake can do wrong, at once."""
    fake.faults.error_rate = 0.05
    fake.faults.drop_after_commit_rate = 0.1
    fake.faults.duplicate_rate = 0.2
    fake.faults.busy_rate = 0.03
    fake.faults.cancel_on_upload_rate = 0.03
    fake.faults.rate_limit_rate = 0.02


def assert_kinguin_invariants(fake: FakeKinguin, stock: dict[str, set[str]]) -> dict[str, int]:
    """What the buyers see: every reservation delivered holds exactly one key, of its SKU,
    no key went to two reservations, no reservation was ever sent a second, different key,
    and every reservation ended delivered or cancelled. Returns the outcome counts."""
    held = fake.keys_by_reservation()
    for rid, keys in held.items():
        res = fake.reservations[rid]
        assert len(keys) == 1, rid
        assert keys[0] in stock[OFFERS[res.offer_id]], rid
        assert res.status == "DELIVERED", rid
    usage = Counter(k for keys in held.values() for k in keys)
    assert max(usage.values()) == 1, "a key went to two reservations"
    sent: dict[str, set[str]] = {}
    for call in fake.uploads:
        if call.reservation_id is not None:
            sent.setdefault(call.reservation_id, set()).add(call.body)
    assert all(len(bodies) == 1 for bodies in sent.values()), "a second key was uploaded"
    statuses = Counter(r.status for r in fake.reservations.values())
    assert set(statuses) <= {"DELIVERED", "CANCELED"}, statuses
    return {"delivered": len(held), "cancelled": statuses["CANCELED"]}


async def test_engine_delivers_every_reservation_once_under_faults(
    tmp_path: Path, fake: FakeKinguin, sqlite_store: Store
) -> None:
    faulty(fake)
    store = sqlite_store
    stock = {}
    for sku in ("GAME-100", "VIP-30D"):
        items = [CardItem(code="", secret=f"{sku}-E2E-{i:05d}") for i in range(320)]
        await store.import_keys(sku, items, "test", time.time())
        stock[sku] = {i.secret for i in items}
    offers = (OFFER_GAME, OFFER_GAME_2, OFFER_VIP)
    reservations = [fake.add_reservation(offers[i % 3]) for i in range(300)]
    unmapped = [fake.add_reservation(OFFER_UNMAPPED) for _ in range(3)]
    config = make_config(tmp_path, fake.base_url, reconcile_interval=1.0)
    config = dataclasses.replace(config, platforms=(kinguin_settings(fake, name="main"),))
    platform = KinguinPlatform(config.platforms[0], CLIENT_SECRET, 16)

    async def settled() -> bool:
        if any(fake.reservations[r].status in ("OUT_OF_STOCK",) for r in reservations):
            return False
        counts = await store.count_by_state()
        return not any(state in ACTIVE_STATES for state in counts)

    async with running_kinguin_agent(config, store, platform):
        await asyncio.sleep(0.2)
        for rid in reservations[-40::4]:  # buyers cancelling while the agent works
            if fake.reservations[rid].status == "OUT_OF_STOCK":
                fake.cancel(rid)
        await wait_for(settled, "every reservation delivered or cancelled")
    for rid in unmapped:  # the merchant's other offers: parked, never touched
        assert fake.reservations[rid].status == "OUT_OF_STOCK"
        fake.cancel(rid)  # as Kinguin will after 15 minutes
        [line] = await store.find_lines(f"{OFFER_UNMAPPED}/{rid}")
        assert line.state == LineState.NEEDS_ATTENTION and "unknown SKU" in (line.reason or "")
    figures = assert_kinguin_invariants(fake, stock)
    # the ledger agrees with what the buyers hold
    held = fake.keys_by_reservation()
    for rid in reservations:
        offer = fake.reservations[rid].offer_id
        lines = await store.find_lines(f"{offer}/{rid}")
        if rid in held:
            assert [line.state for line in lines] == [LineState.DELIVERED]
            assert [i.secret for i in await store.bound_items(lines[0].id)] == held[rid]
        else:  # cancelled: before intake (no line) or before our key landed (closed)
            assert [line.state for line in lines] in ([], [LineState.CANCELLED])
    outcomes = Counter(u.outcome for u in fake.uploads)
    assert outcomes["dropped"] > 0 and fake.errors_injected > 0  # the faults did happen
    assert figures["delivered"] + figures["cancelled"] == 303
    print(f"kinguin e2e: {figures}, uploads {dict(outcomes)}, 5xx {fake.errors_injected}")


# --- the real daemon, killed ------------------------------------------------------------------
DAEMON_RESERVATIONS = 1000
DAEMON_SECRETS = {"KAMI_SECRET_PLATFORM_KINGUIN_SECRET": CLIENT_SECRET}


def write_daemon_config(tmp_path: Path, fake: FakeKinguin) -> Path:
    path = tmp_path / "config.toml"
    offers = "\n".join(f'"{offer}" = "{sku}"' for offer, sku in OFFERS.items())
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

[platforms.kinguin]
kind = "kinguin"
base_url = "{fake.base_url}"
token_url = "{fake.base_url}/auth/token"
api_key = "{CLIENT_ID}"
secret = "platform.kinguin.secret"
timeout = 2.0

[platforms.kinguin.offers]
{offers}

[skus."GAME-100"]
[skus."VIP-30D"]
""",
        encoding="utf-8",
    )
    return path


def ledger_states(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT state, COUNT(*) FROM orders GROUP BY state"))


@pytest.mark.slow
async def test_daemon_killed_three_times_delivers_each_reservation_once(
    tmp_path: Path, fake: FakeKinguin
) -> None:
    rng = random.Random(15)
    faulty(fake)
    config = write_daemon_config(tmp_path, fake)
    log = tmp_path / "daemon.log"
    db = tmp_path / "kami.db"
    stock = {}
    for sku in ("GAME-100", "VIP-30D"):
        values = [f"{sku}-D-{i:05d}-{rng.getrandbits(40):010x}" for i in range(800)]
        stock[sku] = await import_stock(config, DAEMON_SECRETS, tmp_path, sku, values)
    offers = (OFFER_GAME, OFFER_GAME_2, OFFER_VIP)
    reservations: list[str] = []
    kills = Counter[str]()
    # two kills at named crash points (a key uploaded, not yet recorded; an intent committed,
    # not yet sent), one at a random moment
    for crash_at, count in (("after_deliver_call:60", 334), ("after_intent:30", 333), (None, 333)):
        reservations += [fake.add_reservation(rng.choice(offers)) for _ in range(count)]
        for rid in rng.sample(reservations, 5):  # buyers cancelling as they go
            if fake.reservations[rid].status == "OUT_OF_STOCK":
                fake.cancel(rid)
        proc = await start_daemon(config, DAEMON_SECRETS, log, crash_at)
        code, by_itself = await kill_after(proc, 6.0 if crash_at else rng.uniform(1.5, 3.0))
        assert code == -signal.SIGKILL, f"daemon exited with {code}, see {log}"
        kills[crash_at.split(":")[0] if crash_at and by_itself else "random"] += 1
    proc = await start_daemon(config, DAEMON_SECRETS, log)
    deadline = time.monotonic() + 180  # a hang guard only
    while True:
        open_left = [r for r in reservations if fake.reservations[r].status == "OUT_OF_STOCK"]
        states = ledger_states(db) if db.exists() else {}
        if not open_left and not set(states) & {s.value for s in ACTIVE_STATES}:
            break
        assert proc.returncode is None, f"daemon died, see {log}"
        assert time.monotonic() < deadline, f"not settled: {len(open_left)} open, {states}"
        await asyncio.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0, "graceful stop failed"

    figures = assert_kinguin_invariants(fake, stock)
    held = fake.keys_by_reservation()
    store = SQLiteStore(db, master_key_for_tests())
    await store.open()
    try:
        for rid in reservations:
            lines = await store.find_lines(f"{fake.reservations[rid].offer_id}/{rid}")
            if rid in held:
                assert [line.state for line in lines] == [LineState.DELIVERED], rid
                assert [i.secret for i in await store.bound_items(lines[0].id)] == held[rid]
            else:
                assert [line.state for line in lines] in ([], [LineState.CANCELLED]), rid
    finally:
        await store.close()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert CLIENT_SECRET not in text and not [t for t in fake._tokens if t in text]
    assert not [k for keys in held.values() for k in keys if k in text]
    outcomes = Counter(u.outcome for u in fake.uploads)
    assert sum(kills.values()) == 3 and outcomes["dropped"] > 0
    assert figures["delivered"] + figures["cancelled"] == DAEMON_RESERVATIONS
    print(
        f"kinguin daemon: {figures}, kills {dict(kills)}, uploads {dict(outcomes)}, "
        f"5xx {fake.errors_injected}, duplicates as the buyer sees them 0"
    )


# --- the 15-minute window: an alert, and `kami-agent status` ------------------------------------
def due_in(seconds: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds, UTC).isoformat().replace("+00:00", "Z")


async def test_the_ledger_keeps_each_lines_deadline(store: Store) -> None:
    order = PlatformOrder(f"{OFFER_GAME}/r-1", "paid", "GAME-100", 1, deliver_by=due_in(600))
    [line] = await store.take_in("kg", [order], time.time(), frozenset())
    assert isinstance(line, OrderLine) and line.deliver_by == order.deliver_by
    assert [ln.deliver_by for ln in await store.active_lines(10)] == [order.deliver_by]
    assert [ln.deliver_by for ln in await store.find_lines(order.order_id)] == [order.deliver_by]


async def test_a_line_about_to_miss_its_deadline_alerts_and_shows_in_status(
    tmp_path: Path, fake: FakeKinguin
) -> None:
    config_path = write_daemon_config(tmp_path, fake)
    config = load_config(config_path)
    orders = [
        PlatformOrder(f"{OFFER_GAME}/soon", "paid", "GAME-100", 1, deliver_by=due_in(120)),
        PlatformOrder(f"{OFFER_GAME}/later", "paid", "GAME-100", 1, deliver_by=due_in(800)),
        PlatformOrder(f"{OFFER_GAME}/missed", "paid", "GAME-100", 1, deliver_by=due_in(-30)),
        PlatformOrder(f"{OFFER_GAME}/none", "paid", "GAME-100", 1),
    ]
    store = open_test_store("sqlite", tmp_path)  # the ledger `kami-agent init` makes
    await store.open()
    try:
        await store.take_in("kinguin", orders, time.time(), frozenset())
        evaluator = AlertEvaluator(config, store, time.time, {}, {})
        [alert] = [m for m in await evaluator.run() if m.kind == "deadline_near"]
    finally:
        await store.close()
    assert alert.event == "opened" and alert.severity == "critical"
    assert alert.summary.startswith("2 orders about to miss")
    assert f"{OFFER_GAME}/missed (missed)" in alert.summary and "/soon (in " in alert.summary
    assert "/later" not in alert.summary
    out = await run_cli(config_path, DAEMON_SECRETS, "status")
    assert "2 orders near their platform's delivery deadline" in out
    rows = [line.split() for line in out.splitlines()]  # a table: platform, order, deadline
    assert ["kinguin", f"{OFFER_GAME}/missed", "MISSED"] in rows
    assert any(row[:4] == ["kinguin", f"{OFFER_GAME}/soon", "due", "in"] for row in rows)
    assert "/later" not in out.split("deadline")[-1]


def test_the_example_configs_kinguin_block_is_valid_once_uncommented(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "config.example.toml").read_text(encoding="utf-8")
    lines = text.splitlines()
    start = lines.index("# [platforms.kinguin]")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#"))
    lines[start:end] = [line.removeprefix("# ") for line in lines[start:end]]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = load_config(path)
    [kinguin] = [p for p in config.platforms if p.kind == "kinguin"]
    assert isinstance(kinguin.options, KinguinOptions)
    assert kinguin.options.offers == {"5f7efd272f3a650001f42722": "GAME-100"}

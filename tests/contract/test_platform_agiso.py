"""The Agiso (阿奇索) adapter against the doc-built fake gateway (tests/fakes/agiso.py) on
loopback: signing, the envelope's error codes, holds after a refusal, the 20 calls a second
shared per AppId, each channel's delivery exactly once as the buyer sees it under faults,
message caps, pushes; then the real engine in-process on all four channels with faults, and
the deposit running out. The real daemon killed three times is in
tests/e2e/test_platform_agiso_daemon.py."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent import logs
from agent.config import (
    AlertSettings,
    Config,
    ConfigError,
    PlatformSettings,
    SkuSettings,
    load_config,
    parse_config,
)
from agent.domain import (
    ACTIVE_STATES,
    Ambiguous,
    CardItem,
    LineState,
    OrderClosed,
    Permanent,
    PlatformOrder,
    RejectedOrder,
    Transient,
)
from agent.platforms import KINDS, kind_module
from agent.platforms import agiso_client as client_module
from agent.platforms.agiso import AgisoOptions, AgisoPlatform
from agent.platforms.agiso_cardpwd import add_to_pool, pool_levels, take_back
from agent.platforms.agiso_client import (
    AgisoError,
    AgisoRefused,
    AlreadySent,
    BalanceExhausted,
    CallWindow,
    Envelope,
    MessageLimit,
    refusal_for,
    sign,
)
from agent.platforms.agiso_messages import Limits, TooLong, render, split
from agent.platforms.agiso_push import (
    PushDedupe,
    PushRejected,
    push_signature_ok,
    read_push,
    verify_push,
)
from agent.platforms.agiso_wire import xianyu_trade
from agent.runtime import run_engine
from agent.store.base import Store
from tests.conftest import make_config
from tests.fakes.agiso import FakeAgiso, ShiftedClock
from tests.helpers import wait_for

APP_ID = "2024010112345678"
APP_SECRET = "agiso-app-secret-for-tests-0001"
TOKENS = {
    "taobao": "TbAldsTESTTOKENtaobao0000000001",
    "xianyu": "AldsIdleTESTTOKENxianyu00000001",
    "pdd": "PddAldsTESTTOKENpdd000000000001",
    "jd": "AldsJdTESTTOKENjd00000000000001",
}
ITEMS = {"taobao": "3894069941929", "xianyu": "669513624774", "pdd": "55533589398", "jd": "65145"}
PRODUCTS = {channel: {item: "GAME-100"} for channel, item in ITEMS.items()}
OTHER_ITEM = "999000999"  # the merchant's other business: not ours


@pytest.fixture(autouse=True)
def fresh_app_state() -> Iterator[None]:
    """Holds and limiters are process-wide by AppId: each test starts without any."""
    client_module._APP_HOLDS.clear()
    client_module._LIMITERS.clear()
    yield
    client_module._APP_HOLDS.clear()
    client_module._LIMITERS.clear()


@pytest.fixture
async def fake() -> AsyncIterator[FakeAgiso]:
    server = FakeAgiso(APP_ID, APP_SECRET, seed=17, clock=ShiftedClock())
    for channel, token in TOKENS.items():
        server.add_shop(channel, token)
    await server.start()
    yield server
    await server.stop()


def settings(
    fake: FakeAgiso, channel: str, name: str | None = None, **options: Any
) -> PlatformSettings:
    values: dict[str, Any] = {"channel": channel, "access_token_secret": f"agiso.{channel}.token"}
    values["products"] = PRODUCTS[channel]
    values.update(options)
    return PlatformSettings(
        name=name or channel,
        kind="agiso",
        base_url=fake.base_url,
        api_key=APP_ID,
        secret_name="agiso.app.secret",
        timeout=2.0,
        page_size=50,
        options=AgisoOptions(**values),
    )


def adapter_for(
    fake: FakeAgiso, channel: str, *, secret: str = APP_SECRET, **options: Any
) -> AgisoPlatform:
    clock = fake.clock
    return AgisoPlatform(
        settings(fake, channel, **options), secret, TOKENS[channel], 8, clock=clock
    )


@pytest.fixture
async def adapters(fake: FakeAgiso) -> AsyncIterator[dict[str, AgisoPlatform]]:
    made = {channel: adapter_for(fake, channel) for channel in TOKENS}
    yield made
    for platform in made.values():
        await platform.close()


def clock_of(fake: FakeAgiso) -> ShiftedClock:
    assert isinstance(fake.clock, ShiftedClock)
    return fake.clock


def key(n: int, code: bool = True) -> CardItem:
    return CardItem(code=f"CARD{n:06d}" if code else "", secret=f"PWD-{n:06d}-XyZ")


def sightings(fake: FakeAgiso, tid: str, item: CardItem) -> int:
    """How many times the buyer can read this key's secret (duplicates as the buyer sees them
    count more than once)."""
    return sum(text.count(item.secret) for text in fake.buyer_texts(tid))


async def pushed(platform: AgisoPlatform, fake: FakeAgiso, tid: str) -> None:
    query, form = fake.push(tid)
    await platform.accept_push(query, form)


# --- signing, the envelope, pure functions -----------------------------------------------
def test_api_signature_is_md5_of_the_sorted_parameters_between_the_secret() -> None:
    # The guide's own example: foo=1, bar=2, foo_bar=3, foobar=4 -> "bar2foo1foo_bar3foobar4".
    params = {"foo": "1", "bar": "2", "foo_bar": "3", "foobar": "4", "sign": "ignored"}
    expected = hashlib.md5(b"SECRETbar2foo1foo_bar3foobar4SECRET").hexdigest()
    assert sign(params, "SECRET") == expected


def test_push_signature_matches_the_documented_example() -> None:
    # alds/push.md: the AppSecret, json and timestamp of the example give this MD5.
    secret = "9f8g9d78sg9d8f8ew9f89ds9f8ds9af8"
    body = '{"Tid":2067719225654838,"Status":"WAIT_BUYER_CONFIRM_GOODS",......,"TotalFee":"3.00"}'
    assert push_signature_ok(secret, body, "11222212121", "f8aa165fc951f266667e0605d78b93af")
    assert push_signature_ok(secret, body, "11222212121", "F8AA165FC951F266667E0605D78B93AF")
    assert not push_signature_ok(
        secret, body + " ", "11222212121", "f8aa165fc951f266667e0605d78b93af"
    )


def test_a_push_is_verified_before_its_body_is_read() -> None:
    query = {"timestamp": "1700000000", "aopic": "2", "sign": "0" * 32, "fromPlatform": "TbAlds"}
    # not JSON at all, and a wrong signature: refused for the signature, the body never parsed
    with pytest.raises(PushRejected, match="signature"):
        verify_push(APP_SECRET, query, {"json": "{not json"}, now=1700000000, channel="taobao")
    good = sign({"json": "{not json", "timestamp": "1700000000"}, APP_SECRET)
    with pytest.raises(PushRejected, match="not JSON"):
        verify_push(
            APP_SECRET,
            query | {"sign": good},
            {"json": "{not json"},
            now=1700000000,
            channel="taobao",
        )
    with pytest.raises(PushRejected, match="off"):  # stale
        verify_push(
            APP_SECRET,
            query | {"sign": good},
            {"json": "{not json"},
            now=1700009000,
            channel="taobao",
        )
    with pytest.raises(PushRejected, match="not taobao"):  # a push for another channel
        verify_push(
            APP_SECRET,
            query | {"sign": good, "fromPlatform": "PddAlds"},
            {"json": "{not json"},
            now=1700000000,
            channel="taobao",
        )


@pytest.mark.parametrize(
    ("code", "allow", "write", "expected"),
    [
        (1, None, False, AgisoRefused),
        (4, None, True, AgisoRefused),
        (8, None, False, AgisoRefused),
        (16, None, True, BalanceExhausted),
        (17, None, False, AgisoRefused),
        (2, None, True, Transient),
        (13, None, True, Ambiguous),
        (13, None, False, Transient),
        (10, True, True, Transient),
        (10, None, True, Transient),
        (10, False, True, AgisoError),
        (12, None, True, AlreadySent),
        (25, None, True, MessageLimit),
        (5, None, True, AgisoError),
        (7, True, True, Transient),
    ],
)
def test_error_codes_map_to_our_classes(
    code: int, allow: bool | None, write: bool, expected: type[Exception]
) -> None:
    envelope = Envelope(False, None, code, "说明", allow, "1")
    error = refusal_for(envelope, "alds/Trade/X", write=write)
    assert type(error) is expected
    if isinstance(error, AgisoRefused):
        assert error.scope == ("shop" if code in (1, 8) else "app")


def test_templates_take_chinese_and_english_names_and_repeat_card_lines() -> None:
    items = [key(1), key(2, code=False)]
    text = render(
        "订单{订单号}/{order_id}：{商品}×{quantity}\n{卡号}|{secret}\n谢谢{{}}",
        "T1",
        "点卡",
        2,
        items,
    )
    assert text.splitlines() == [
        "订单T1/T1：点卡×2",
        "CARD000001|PWD-000001-XyZ",
        "|PWD-000002-XyZ",
        "谢谢{}",
    ]
    plain = render("感谢购买", "T1", "点卡", 2, items)  # no card variable: keys appended
    assert plain.splitlines()[1:] == [
        "卡号：CARD000001  卡密：PWD-000001-XyZ",
        "卡密：PWD-000002-XyZ",
    ]


def test_messages_split_between_lines_within_the_channel_limits() -> None:
    lines = [f"卡密：{'x' * 90}-{i}" for i in range(25)]
    parts = split("\n".join(lines), Limits(1000, 5), "闲鱼")
    assert len(parts) == 3 and all(len(p) <= 1000 for p in parts)
    assert "\n".join(parts).splitlines() == lines  # nothing lost, no key cut in two
    with pytest.raises(TooLong, match="超过每单 2 条"):
        split("\n".join(lines), Limits(1000, 2), "闲鱼")
    with pytest.raises(TooLong, match="一行"):
        split("x" * 1001, Limits(1000, 5), "闲鱼")


async def test_the_call_window_never_lets_more_than_the_limit_arrive_in_a_second() -> None:
    """Calls that wait after their slot (for a connection) arrive late; counted from their
    answers, no second still sees more than the limit arrive, however they bunch."""
    now = [0.0]
    arrivals: list[float] = []

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    window = CallWindow(20, clock=lambda: now[0], sleep=sleep)
    for n in range(200):
        async with window.slot():
            delay = 0.9 if n % 7 == 0 else 0.001  # some wait long before they go out
            now[0] += delay
            arrivals.append(now[0])
    arrivals.sort()
    for i, t in enumerate(arrivals):  # any 21 consecutive arrivals span a second or more
        if i >= 20:
            assert t - arrivals[i - 20] >= 1.0


# --- configuration -----------------------------------------------------------------------
def agiso_toml(**extra: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "kind": "agiso",
        "base_url": "https://gw-api.agiso.com",
        "api_key": APP_ID,
        "secret": "agiso.app.secret",
        "access_token": "agiso.taobao.token",
        "channel": "taobao",
        "products": {"3894069941929": "GAME-100"},
        "templates": {"GAME-100": "您的卡密：{卡密}（订单 {订单号}）"},
    }
    section.update(extra)
    return {"store": {"path": "kami.db"}, "platforms": {"tb": section}}


def test_config_reads_agiso_options(tmp_path: Path) -> None:
    assert "agiso" in KINDS and kind_module("agiso").parse_options is not None
    config = parse_config(agiso_toml(message_cap=2), tmp_path / "c.toml")
    options = config.platforms[0].options
    assert isinstance(options, AgisoOptions)
    assert options.channel == "taobao" and options.access_token_secret == "agiso.taobao.token"
    assert options.message_cap == 2 and options.calls_per_second == 18
    limits = options.limits()
    assert limits is not None and (limits.chars, limits.count) == (5000, 2)
    # `kami-agent check` and `secrets list-missing` ask for the shop's token too
    assert "agiso.taobao.token" in config.secret_names()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"channel": "douyin"}, "channel: must be one of"),
        ({"templates": {"GAME-100": "{买家}"}}, "unknown variable"),
        ({"access_token": "TbAldsfx5445w83zxbewbwprkmmxv8sanrk4343"}, "NAME of a secret"),
        ({"base_url": "http://gw-api.agiso.com"}, "must be https"),
        ({"message_cap": 4}, "message_cap: must be between"),
        ({"calls_per_second": 21}, "calls_per_second: must be between"),
        ({"products": {}}, "products: is required"),
    ],
)
def test_config_rejects_bad_agiso_options(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        parse_config(agiso_toml(**extra), tmp_path / "c.toml")
    assert "TbAldsfx5445" not in str(raised.value)


# --- the client against the fake ---------------------------------------------------------
async def test_a_wrong_app_secret_stops_every_shop_until_a_probe_passes(fake: FakeAgiso) -> None:
    bad = adapter_for(fake, "taobao", secret="not-the-app-secret")
    other = adapter_for(fake, "xianyu")
    try:
        with pytest.raises(AgisoRefused, match="验签失败") as raised:
            await bad.list_paid(None)
        assert raised.value.scope == "app"
        calls = len(fake.calls)
        for platform in (bad, other):  # the AppId's hold: no call reaches Agiso
            with pytest.raises(AgisoRefused):
                await platform.get_order("1")
        assert len(fake.calls) == calls
        clock_of(fake).offset += 61  # the probe interval: one call goes through
        with pytest.raises(AgisoRefused):
            await bad.list_paid(None)
        assert len(fake.calls) == calls + 1
        assert APP_SECRET not in str(raised.value)
    finally:
        await bad.close()
        await other.close()


async def test_an_expired_token_stops_that_shop_only(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    fake.shops[TOKENS["taobao"]].expired = True
    with pytest.raises(AgisoRefused, match="无效AccessToken") as raised:
        await adapters["taobao"].list_paid(None)
    assert raised.value.scope == "shop"
    calls = len(fake.calls)
    with pytest.raises(AgisoRefused):
        await adapters["taobao"].get_order("1")
    assert len(fake.calls) == calls  # held: not called
    tid = fake.add_order("xianyu", ITEMS["xianyu"])
    assert (await adapters["xianyu"].get_order(tid)).status == "paid"  # other shops go on
    fake.shops[TOKENS["taobao"]].expired = False  # the merchant authorised again
    clock_of(fake).offset += 61
    page = await adapters["taobao"].list_paid(None)  # the probe passes: calls resume
    assert page.orders == []
    assert adapters["taobao"].client.holds.shop is None


async def test_twenty_calls_a_second_shared_by_the_shops_of_one_app_id(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    tids = {c: fake.add_order(c, ITEMS[c]) for c in TOKENS}
    reads = [adapters[c].get_order(tids[c]) for c in TOKENS for _ in range(15)]
    results = await asyncio.gather(*reads)
    assert all(r.status == "paid" for r in results)
    assert fake.quota_refusals == 0  # 60 calls across four shops, never 20 in a second


async def test_rate_limit_answers_are_transient(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    greedy = adapter_for(fake, "jd", calls_per_second=20)
    # another process of the same AppId (so with its own limiter) pushes the gateway over 20/s
    elsewhere = dataclasses.replace(settings(fake, "jd", name="jd2"), api_key="other-process")
    other = AgisoPlatform(elsewhere, APP_SECRET, TOKENS["jd"], 8, clock=fake.clock)
    tid = fake.add_order("jd", ITEMS["jd"])
    try:
        outcomes = await asyncio.gather(
            *[p.get_order(tid) for p in (greedy, other) for _ in range(30)], return_exceptions=True
        )
    finally:
        await greedy.close()
        await other.close()
    assert fake.quota_refusals > 0
    assert all(not isinstance(o, BaseException) or isinstance(o, Transient) for o in outcomes)


# --- 淘宝 ----------------------------------------------------------------------------------
async def test_taobao_listing_maps_items_to_skus_and_skips_other_items(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    ours = [fake.add_order("taobao", ITEMS["taobao"], quantity=2) for _ in range(3)]
    fake.add_order("taobao", OTHER_ITEM)
    page = await adapters["taobao"].list_paid(None)
    assert sorted(o.order_id for o in page.orders) == sorted(ours)
    assert all(
        isinstance(o, PlatformOrder) and o.sku == "GAME-100" and o.quantity == 2
        for o in page.orders
    )
    assert not page.has_more and page.next_cursor is not None


# Our default delivery message in either language (agent.buyer_language) is Agiso's template.
@pytest.mark.parametrize("default_message", ["Thank you for your order.", "感谢您的购买。"])
async def test_taobao_delivery_is_a_result_a_shipped_order_and_one_message(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform], default_message: str
) -> None:
    tid = fake.add_order("taobao", ITEMS["taobao"], quantity=2, title="游戏点卡100元")
    items = [key(1), key(2)]
    await adapters["taobao"].deliver(tid, "kami-x-1", items, default_message)
    order = fake.orders[tid]
    assert [[c["c"] for c in r] for r in order.results] == [["CARD000001", "CARD000002"]]
    assert order.status == "WAIT_BUYER_CONFIRM_GOODS" and len(order.ww) == 1
    assert order.ww[0].startswith("亲，您购买的「游戏点卡100元」已发货，订单号 " + tid)
    assert all(sightings(fake, tid, i) == 2 for i in items)  # the result and the message
    remote = await adapters["taobao"].get_order(tid)
    assert remote.status == "delivered" and sorted(remote.items, key=repr) == sorted(
        items, key=repr
    )


async def test_taobao_lost_answers_never_show_the_buyer_a_key_twice(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    fake.faults.lose_after_change_rate = 1.0
    fake.faults.only = frozenset({"/Trade/LogisticsDummySend", "/WwMsg/Send"})
    tid = fake.add_order("taobao", ITEMS["taobao"])
    await adapters["taobao"].deliver(tid, "kami-x-1", [key(1)], "")
    order = fake.orders[tid]
    assert order.status == "WAIT_BUYER_CONFIRM_GOODS"  # the lost dummy send read back
    assert len(order.ww) == 1 and order.ww_calls == 1  # the lost message was not sent again
    assert sightings(fake, tid, key(1)) == 2
    # a result whose answers are all lost: not shipped, nothing told; sent again later
    fake.faults.only = frozenset({"/Trade/CreateOrderResult"})
    tid = fake.add_order("taobao", ITEMS["taobao"])
    with pytest.raises(Ambiguous):
        await adapters["taobao"].deliver(tid, "kami-x-2", [key(2)], "")
    order = fake.orders[tid]
    assert order.status == "WAIT_SELLER_SEND_GOODS" and order.ww == [] and order.results
    fake.faults.lose_after_change_rate = 0.0
    assert (await adapters["taobao"].get_order(tid)).status == "paid"
    await adapters["taobao"].deliver(tid, "kami-x-2", [key(2)], "")
    assert len({json.dumps(r) for r in order.results}) == 1  # the same content each time
    assert sightings(fake, tid, key(2)) == 2


async def test_taobao_message_too_long_for_the_cap_is_refused_before_anything_is_sent(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    tid = fake.add_order("taobao", ITEMS["taobao"], quantity=300)
    items = [CardItem(f"C{i}", f"{'P' * 40}-{i:04d}") for i in range(300)]
    with pytest.raises(Permanent, match="超过每单 3 条"):
        await adapters["taobao"].deliver(tid, "k", items, "")
    order = fake.orders[tid]
    assert order.results == [] and order.status == "WAIT_SELLER_SEND_GOODS" and order.ww == []


async def test_taobao_order_closed_before_delivery(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    tid = fake.add_order("taobao", ITEMS["taobao"])
    fake.close_order(tid)
    with pytest.raises(OrderClosed):
        await adapters["taobao"].deliver(tid, "k", [key(1)], "")
    assert (await adapters["taobao"].get_order(tid)).status == "refunded"


async def test_a_taobao_order_shipped_by_agisos_own_pool_shows_its_cards(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    tid = fake.add_order("taobao", ITEMS["taobao"])
    fake.orders[tid].status = "WAIT_BUYER_CONFIRM_GOODS"
    fake.orders[tid].pool_cards.append(("POOL1", "POOLPWD"))
    remote = await adapters["taobao"].get_order(tid)  # the engine compares, parks "other keys"
    assert remote.status == "delivered" and remote.items == (CardItem("POOL1", "POOLPWD"),)
    with pytest.raises(Permanent, match="已经发货"):
        await adapters["taobao"].deliver(tid, "k", [key(1)], "")


# --- 闲鱼 ----------------------------------------------------------------------------------
async def test_xianyu_ships_then_sends_the_keys_split_within_five_messages(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    tid = fake.add_order("xianyu", ITEMS["xianyu"], quantity=30)
    await pushed(adapters["xianyu"], fake, tid)
    [order] = (await adapters["xianyu"].list_paid(None)).orders
    assert isinstance(order, PlatformOrder) and order.quantity == 30
    items = [CardItem(f"C{i:03d}", f"{'p' * 60}{i:03d}") for i in range(30)]
    await adapters["xianyu"].deliver(tid, "k", items, "")
    fake_order = fake.orders[tid]
    assert fake_order.status == "3" and 1 < len(fake_order.im) <= 5
    assert all(len(m) <= 1000 for m in fake_order.im)
    assert all(sightings(fake, tid, i) == 1 for i in items)
    assert (await adapters["xianyu"].get_order(tid)).status == "delivered"


async def test_xianyu_message_whose_answer_is_lost_is_parked_not_sent_again(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    fake.faults.lose_after_change_rate = 1.0
    fake.faults.only = frozenset({"/ImMsg/SendMsg"})
    tid = fake.add_order("xianyu", ITEMS["xianyu"])
    with pytest.raises(Permanent, match="是否送达未知"):
        await adapters["xianyu"].deliver(tid, "k", [key(1)], "")
    with pytest.raises(Permanent, match="是否送达未知"):  # the engine asking again
        await adapters["xianyu"].deliver(tid, "k", [key(1)], "")
    assert sightings(fake, tid, key(1)) == 1  # the buyer got it exactly once


async def test_xianyu_order_shipped_before_a_restart_is_parked(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    tid = fake.add_order("xianyu", ITEMS["xianyu"])
    fake.orders[tid].status = "3"  # shipped by a process that died before recording it
    with pytest.raises(Permanent, match="没有接口读回"):
        await adapters["xianyu"].get_order(tid)


async def test_a_delivery_stopped_by_a_refusal_resumes_without_a_second_message(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    tid = fake.add_order("xianyu", ITEMS["xianyu"])
    platform = adapters["xianyu"]
    fake.deposit = fake.price * 2.5  # enough for the read and the dummy send only
    with pytest.raises(BalanceExhausted):
        await platform.deliver(tid, "k", [key(1)], "")
    assert fake.orders[tid].status == "3" and fake.orders[tid].im == []
    fake.deposit = 100.0  # topped up
    clock_of(fake).offset += 61
    assert (await platform.get_order(tid)).status == "paid"  # shipped by us, message pending
    await platform.deliver(tid, "k", [key(1)], "")
    assert sightings(fake, tid, key(1)) == 1
    assert (await platform.get_order(tid)).status == "delivered"


# --- 拼多多 and 京东 --------------------------------------------------------------------------
async def test_pdd_card_send_with_lost_answers_lands_once(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    fake.faults.lose_after_change_rate = 1.0
    tid = fake.add_order("pdd", ITEMS["pdd"])
    await adapters["pdd"].deliver(tid, "k", [key(1)], "")
    assert fake.orders[tid].cards == [("CARD000001", "PWD-000001-XyZ")]
    remote = await adapters["pdd"].get_order(tid)
    assert remote.status == "delivered" and remote.items == (key(1),)


async def test_pdd_orders_of_several_units_are_refused_at_intake(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    tid = fake.add_order("pdd", ITEMS["pdd"], quantity=3)
    await pushed(adapters["pdd"], fake, tid)
    [order] = (await adapters["pdd"].list_paid(None)).orders
    assert isinstance(order, RejectedOrder) and "one card" in order.reason


async def test_jd_card_send_with_lost_answers_lands_once(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    fake.faults.lose_after_change_rate = 1.0
    tid = fake.add_order("jd", ITEMS["jd"], quantity=2)
    await adapters["jd"].deliver(tid, "k", [key(1), key(2)], "")
    order = fake.orders[tid]
    assert order.card_sends == 1 and len(order.cards) == 2
    assert (await adapters["jd"].get_order(tid)).status == "delivered"


@pytest.mark.parametrize("fault", ["allow_retry_rate", "error_before_rate"])
async def test_allow_retry_and_5xx_before_the_change_are_retried(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform], fault: str
) -> None:
    setattr(fake.faults, fault, 0.4)
    if fault == "error_before_rate":
        # a 5xx on a message is a message whose outcome is unknown (tested above): not here
        writes = {"/Trade/CreateOrderResult", "/Trade/LogisticsDummySend", "/Order/DummySend"}
        reads = {"/Trade/TradeInfo", "/Order/Detail", "/Trade/Detail", "/Cpd/GetLastSentResult"}
        fake.faults.only = frozenset(
            writes | reads | {"/DummySend/CardPwdSend", "/GameCard/CardSend"}
        )
    for channel in TOKENS:
        tid = fake.add_order(channel, ITEMS[channel])
        for _ in range(20):
            try:
                await adapters[channel].deliver(tid, "k", [key(7)], "")
                break
            except (Transient, Ambiguous):
                continue
        assert sightings(fake, tid, key(7)) == (2 if channel == "taobao" else 1), channel
    assert any(c.outcome.startswith("fault") for c in fake.calls)


# --- pushes ------------------------------------------------------------------------------
async def test_repeated_pushes_queue_an_order_once(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    for channel in ("xianyu", "pdd", "jd", "taobao"):
        tid = fake.add_order(channel, ITEMS[channel])
        for _ in range(3):
            await pushed(adapters[channel], fake, tid)
        page = await adapters[channel].list_paid(None)
        assert [o.order_id for o in page.orders].count(tid) == 1, channel
        again = await adapters[channel].list_paid(page.next_cursor)  # committed: gone
        assert tid not in [o.order_id for o in again.orders] or channel == "taobao"


async def test_a_listing_not_committed_lists_the_pushed_orders_again(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    tid = fake.add_order("jd", ITEMS["jd"])
    await pushed(adapters["jd"], fake, tid)
    first = await adapters["jd"].list_paid(None)
    again = await adapters["jd"].list_paid(None)  # the engine failed to commit the first
    assert [o.order_id for o in first.orders] == [o.order_id for o in again.orders] == [tid]


def test_dedupe_keys_on_order_and_status() -> None:
    seen = PushDedupe()
    from agent.platforms.agiso_push import Push

    paid = read_push(Push("xianyu", 1, 0, {"biz_order_id": 1, "order_status": 2}))
    closed = read_push(Push("xianyu", 64, 0, {"biz_order_id": 1, "order_status": 6}))
    assert paid.paid and not closed.paid
    assert seen.first(paid) and not seen.first(paid) and seen.first(closed)


# --- consignment calls (wired later) -----------------------------------------------------
async def test_card_pool_calls(fake: FakeAgiso, adapters: dict[str, AgisoPlatform]) -> None:
    client = adapters["taobao"].client
    result = await add_to_pool(client, "551426", [key(1), key(2, code=False)])
    assert (result.added, result.failed) == (2, 0)
    fake.faults.lose_after_change_rate = 1.0
    with pytest.raises(Ambiguous):
        await add_to_pool(client, "551426", [key(3)])
    fake.faults.lose_after_change_rate = 0.0
    again = await add_to_pool(client, "551426", [key(3)])  # the same line again: not doubled
    assert (again.added, again.failed) == (0, 1)
    assert await pool_levels(client, ["551426"]) == {"551426": 3}
    assert await take_back(client, "551426", "CARD000001") == 1
    with pytest.raises(Permanent, match="comma"):
        await add_to_pool(client, "551426", [CardItem("a,b", "c")])
    with pytest.raises(Permanent, match="1000"):
        await add_to_pool(client, "551426", [key(i) for i in range(1001)])


# --- logs --------------------------------------------------------------------------------
@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    sink = io.StringIO()
    logs.configure("debug", sink)
    yield sink
    logs.configure("debug", io.StringIO())


async def test_no_token_secret_or_key_in_the_logs(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform], captured: io.StringIO
) -> None:
    fake.faults.lose_after_change_rate = 1.0
    fake.faults.only = frozenset({"/ImMsg/SendMsg"})
    tid = fake.add_order("xianyu", ITEMS["xianyu"])
    with pytest.raises(Permanent):
        await adapters["xianyu"].deliver(tid, "k", [key(1)], "")
    fake.shops[TOKENS["taobao"]].expired = True
    with pytest.raises(AgisoRefused):
        await adapters["taobao"].list_paid(None)
    text = captured.getvalue()
    assert "agiso_calls_stopped" in text and "token_fp" in text
    assert APP_SECRET not in text and key(1).secret not in text
    assert not [t for t in TOKENS.values() if t in text]


# --- the real engine, in-process ---------------------------------------------------------
@asynccontextmanager
async def running(
    config: Config, store: Store, platforms: dict[str, AgisoPlatform]
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_engine(config, store, dict(platforms), stop))
    try:
        yield
    finally:
        stop.set()
        await task
        for platform in platforms.values():
            await platform.close()


def engine_config(tmp_path: Path, fake: FakeAgiso, channels: list[str]) -> Config:
    config = make_config(tmp_path, fake.base_url, reconcile_interval=2.0, poll_interval=1.0)
    return dataclasses.replace(
        config,
        platforms=tuple(settings(fake, c) for c in channels),
        skus={"GAME-100": SkuSettings(sku="GAME-100", max_quantity=10)},
        alerts=AlertSettings(forecast_interval=0.1),
    )


async def stock(store: Store, count: int) -> set[str]:
    items = [CardItem(f"E2E{i:05d}", f"E2E-PWD-{i:05d}-qq") for i in range(count)]
    await store.import_keys("GAME-100", items, "test", time.time())
    return {i.secret for i in items}


def check_buyers(fake: FakeAgiso, keys: set[str]) -> Counter[str]:
    """What every buyer sees: a key of ours at most once in the messages and (淘宝) exactly
    once in the delivery result the buyer extracts, and no key on two orders. Returns how many
    keys each order shows."""
    owner: dict[str, str] = {}
    shown = Counter[str]()
    for tid, order in fake.orders.items():
        result = [f"{c['c']}\t{c['p']}" for c in order.results[-1]] if order.results else []
        messages = order.ww + order.im
        cards = [f"{c}\t{p}" for c, p in order.cards]
        for secret in keys:
            in_result = sum(t.count(secret) for t in result)
            in_messages = sum(t.count(secret) for t in messages)
            in_cards = sum(t.count(secret) for t in cards)
            if not in_result + in_messages + in_cards:
                continue
            assert in_messages <= 1 and in_cards <= 1, f"{tid} shows {secret} twice"
            if order.channel == "taobao":
                assert in_result == 1, f"{tid}: {secret} not once in the result"
            else:
                assert in_result + in_messages + in_cards == 1, f"{tid} shows {secret} twice"
            assert owner.setdefault(secret, tid) == tid, f"{secret} on two orders"
            shown[tid] += 1
    return shown


async def settle(condition: Any, what: str, guard: float = 150.0) -> None:
    """tests.helpers.wait_for with a longer hang guard: the calls go at 18 a second."""
    deadline = time.monotonic() + guard
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


PER = 20  # orders per channel


async def test_engine_delivers_all_four_channels_once_under_faults(
    tmp_path: Path, fake: FakeAgiso, sqlite_store: Store
) -> None:
    store = sqlite_store
    keys = await stock(store, 400)
    channels = list(TOKENS)
    config = engine_config(tmp_path, fake, channels)
    platforms = {
        c: AgisoPlatform(config.platforms[i], APP_SECRET, TOKENS[c], 16, clock=fake.clock)
        for i, c in enumerate(channels)
    }
    fake.faults.allow_retry_rate = 0.1
    fake.faults.error_before_rate = 0.05
    fake.faults.lose_after_change_rate = 0.08
    fake.faults.error_after_change_rate = 0.04
    orders = {
        c: [fake.add_order(c, ITEMS[c], 1 if c == "pdd" else 1 + n % 3) for n in range(PER)]
        for c in channels
    }
    others = [fake.add_order("taobao", OTHER_ITEM) for _ in range(3)]

    async def settled() -> bool:
        counts = await store.count_by_state()
        lines = sum(counts.values())
        return lines == 4 * PER and not any(s in ACTIVE_STATES for s in counts)

    async with running(config, store, platforms):
        for c in ("xianyu", "pdd", "jd"):  # pushes, some repeated (the listener's part)
            for tid in orders[c]:
                for _ in range(1 + (int(tid[-1]) % 2)):
                    await pushed(platforms[c], fake, tid)
        await settle(settled, "every order delivered or parked")
    shown = check_buyers(fake, keys)
    figures: Counter[str] = Counter()
    for c in channels:
        for tid in orders[c]:
            [line] = await store.find_lines(tid)
            if line.state == LineState.DELIVERED:
                bound = await store.bound_items(line.id)
                assert shown[tid] == len(bound) == fake.orders[tid].quantity, tid
                figures[f"{c}:delivered"] += 1
            else:
                assert line.state == LineState.NEEDS_ATTENTION, (tid, line.state)
                assert line.reason and ("未知" in line.reason or "读回" in line.reason), line.reason
                assert shown[tid] in (0, line.quantity)  # never more than once
                figures[f"{c}:parked"] += 1
    for tid in others:
        assert fake.orders[tid].results == [] and not await store.find_lines(tid)
    faults = Counter(c.outcome for c in fake.calls if c.outcome.startswith("fault"))
    assert faults["fault:lost"] > 0 and faults["fault:allow_retry"] > 0
    assert fake.quota_refusals == 0
    print(f"agiso e2e: {dict(figures)}, faults {dict(faults)}, duplicates as the buyer sees them 0")


async def test_deposit_running_out_alerts_stops_calls_and_loses_no_order(
    tmp_path: Path, fake: FakeAgiso, sqlite_store: Store
) -> None:
    store = sqlite_store
    keys = await stock(store, 100)
    config = engine_config(tmp_path, fake, ["taobao", "jd"])
    config = dataclasses.replace(
        config,
        platforms=tuple(settings(fake, c, probe_interval=1.0) for c in ("taobao", "jd")),
    )
    platforms = {
        c: AgisoPlatform(config.platforms[i], APP_SECRET, TOKENS[c], 16, clock=fake.clock)
        for i, c in enumerate(["taobao", "jd"])
    }
    fake.deposit = fake.price * 40  # runs out within the first orders
    tb = [fake.add_order("taobao", ITEMS["taobao"]) for _ in range(20)]
    jd = [fake.add_order("jd", ITEMS["jd"]) for _ in range(20)]

    async def alert_open() -> bool:
        return any(a.key.startswith("auth:") for a in await store.open_alerts())

    async with running(config, store, platforms):
        for tid in jd:
            await pushed(platforms["jd"], fake, tid)
        await wait_for(alert_open, "the credentials alert")
        refused = sum(1 for c in fake.calls if c.outcome == "refused:16")
        await asyncio.sleep(1.0)  # polls and retries go on meanwhile, against the hold
        assert sum(1 for c in fake.calls if c.outcome == "refused:16") <= refused + 2
        assert [t for t in tb + jd if not fake.shipped(t)]  # orders wait
        fake.deposit = 100.0  # topped up: the next probe (a second later) lifts the hold

        async def all_delivered() -> bool:
            counts = await store.count_by_state()
            return counts.get(LineState.DELIVERED, 0) == 40

        await settle(all_delivered, "every order delivered after the top-up")
        await settle(lambda: alert_cleared(store), "the alert resolved")
    shown = check_buyers(fake, keys)
    assert all(shown[t] == 1 for t in tb + jd)


async def alert_cleared(store: Store) -> bool:
    return not any(a.key.startswith("auth:") for a in await store.open_alerts())


def test_the_chinese_setup_example_is_a_valid_config(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs/platforms/agiso.md").read_text(
        encoding="utf-8"
    )
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    lines = [line.removeprefix("   ") for line in block.splitlines()]  # the list's indent
    path = tmp_path / "config.toml"
    path.write_text('[store]\npath = "kami.db"\n\n' + "\n".join(lines), encoding="utf-8")
    config = load_config(path)
    options = config.platforms[0].options
    assert isinstance(options, AgisoOptions) and options.channel == "taobao"
    rendered = render(options.templates["GAME-100"], "T1", "点卡", 1, [key(1)])
    assert "卡号：CARD000001  卡密：PWD-000001-XyZ" in rendered


async def test_messages_the_cap_cannot_hold_are_parked_with_the_reason(
    tmp_path: Path, fake: FakeAgiso, sqlite_store: Store
) -> None:
    store = sqlite_store
    await stock(store, 50)
    config = engine_config(tmp_path, fake, ["xianyu"])
    long_line = {
        "GAME-100": "{卡} " + "请在游戏内兑换，兑换后概不退换。" * 12
    }  # ~230 characters a key
    config = dataclasses.replace(
        config,
        platforms=(settings(fake, "xianyu", templates=long_line),),
        skus={"GAME-100": SkuSettings(sku="GAME-100", max_quantity=50)},
    )
    platform = AgisoPlatform(config.platforms[0], APP_SECRET, TOKENS["xianyu"], 8, clock=fake.clock)
    used_up = fake.add_order("xianyu", ITEMS["xianyu"])
    fake.orders[used_up].im += ["商家聊天"] * 5  # the merchant used the order's 5 messages
    too_many = fake.add_order("xianyu", ITEMS["xianyu"], quantity=40)  # 40 lines: 10 messages

    async def parked() -> bool:
        return (await store.count_by_state()).get(LineState.NEEDS_ATTENTION, 0) == 2

    async with running(config, store, {"xianyu": platform}):
        for tid in (used_up, too_many):
            await pushed(platform, fake, tid)
        await settle(parked, "both orders parked")
    [line] = await store.find_lines(used_up)
    assert line.reason and "消息条数已达上限" in line.reason
    [line] = await store.find_lines(too_many)
    assert line.reason and "超过每单 5 条的上限" in line.reason
    assert fake.orders[too_many].status == "2" and fake.orders[too_many].im == []  # nothing sent


async def test_other_keys_for_an_order_shipped_half_way_are_refused_not_sent(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    tid = fake.add_order("xianyu", ITEMS["xianyu"])
    platform = adapters["xianyu"]
    fake.deposit = fake.price * 2.5  # the read and the dummy send, then the deposit is out
    with pytest.raises(BalanceExhausted):
        await platform.deliver(tid, "k", [key(1)], "")
    fake.deposit = 100.0
    clock_of(fake).offset += 61
    with pytest.raises(Permanent, match="已经发货"):  # never a second set of keys
        await platform.deliver(tid, "k", [key(2)], "")
    assert sightings(fake, tid, key(2)) == 0 and fake.orders[tid].im == []


# --- conformance with Agiso's documentation (audit) --------------------------------------
@pytest.mark.parametrize(
    ("items", "expected", "scope"),
    [
        ([{"Tid": 1, "ErrorCode": -85, "AllowRetry": True}], Transient, None),
        ([{"Tid": 1, "ErrorCode": -85}], Transient, None),
        ({"Tid": 1, "ErrorCode": -90, "AllowRetry": False}, AgisoRefused, "shop"),
        ([{"Tid": 1, "ErrorCode": -50, "AllowRetry": False}], AgisoError, None),
        (
            [{"Tid": 1, "ErrorCode": -85, "AllowRetry": True}, {"Tid": 2, "ErrorCode": -86}],
            AgisoError,
            None,
        ),
    ],
)
def test_a_failed_batch_is_judged_by_its_items(
    items: Any, expected: type[Exception], scope: str | None
) -> None:
    # alds/api.md LogisticsDummySend: Error_Code 7 全部失败 with the envelope's AllowRetry null
    # and Data.ErrorInfos per trade; DummySendErrorInfo: -85 可重试的错误, -50 重复发货,
    # -86 不可重试, -90 授权失败.
    envelope = Envelope(False, {"ErrorInfos": items}, 7, "全部失败", None, "1")
    error = refusal_for(envelope, "alds/Trade/LogisticsDummySend", write=True)
    assert type(error) is expected
    if scope is not None:
        assert isinstance(error, AgisoRefused) and error.scope == scope


async def test_a_dummy_send_refused_as_retryable_per_trade_is_retried_not_parked(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    fake.faults.dummy_send_retryable = 1  # 7 全部失败, the trade's ErrorCode -85 AllowRetry true
    tid = fake.add_order("taobao", ITEMS["taobao"])
    await adapters["taobao"].deliver(tid, "k", [key(1)], "")
    assert fake.shipped(tid) and sightings(fake, tid, key(1)) == 2  # the result and the message
    assert [c.path for c in fake.calls].count("/Trade/LogisticsDummySend") == 2


async def test_nothing_found_answered_as_error_11_is_an_empty_answer(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    # errorCode.md: 11 / 114 没有数据. A sent log without cards and an empty page of trades
    # answered so are empty answers, not failures.
    fake.no_data_as_error = True
    page = await adapters["taobao"].list_paid(None)
    assert page.orders == [] and not page.has_more
    tid = fake.add_order("pdd", ITEMS["pdd"])
    await adapters["pdd"].deliver(tid, "k", [key(1)], "")
    assert fake.orders[tid].cards == [("CARD000001", "PWD-000001-XyZ")]
    assert (await adapters["pdd"].get_order(tid)).status == "delivered"


async def test_a_page_of_trades_answered_as_one_object_is_read(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    fake.single_trade_as_object = True  # TradesBuyerPay's documented example: Data = a trade
    tid = fake.add_order("taobao", ITEMS["taobao"])
    page = await adapters["taobao"].list_paid(None)
    assert [o.order_id for o in page.orders] == [tid]


async def test_amounts_are_yuan_and_times_utc_on_every_channel(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    # 淘宝 Payment "3.00" (元); 闲鱼 /Order/Detail payment 1990 "单位分" and pay_time in ms;
    # 拼多多 PayAmount 0.1 (元); 京东 TotalPrice 12.36 (元). Times: China Standard Time.
    tid = fake.add_order("taobao", ITEMS["taobao"])
    [order] = (await adapters["taobao"].list_paid(None)).orders
    assert isinstance(order, PlatformOrder)
    assert (order.amount, order.currency) == ("3.00", "CNY")
    paid = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(fake.orders[tid].modified))
    assert order.paid_at == paid
    expected = {"xianyu": "19.90", "pdd": "0.10", "jd": "12.36"}
    for channel, amount in expected.items():
        tid = fake.add_order(channel, ITEMS[channel])
        await pushed(adapters[channel], fake, tid)
        [order] = (await adapters[channel].list_paid(None)).orders
        assert isinstance(order, PlatformOrder)
        assert (order.amount, order.currency) == (amount, "CNY"), channel
    # The documented 闲鱼 example: pay_time 1647677841000 (ms), payment 1 (分).
    xianyu = xianyu_trade({"biz_order_id": 1, "pay_time": 1647677841000, "payment": 1})
    assert (xianyu.paid_at, xianyu.amount) == ("2022-03-19T08:17:21Z", "0.01")


async def test_a_pdd_order_with_a_refund_pending_gets_no_card_until_it_is_settled(
    fake: FakeAgiso, adapters: dict[str, AgisoPlatform]
) -> None:
    # aldsPdd /Trade/Detail refund_status: 1 无售后或售后关闭, 2 售后处理中, 3 退款中, 4 退款成功.
    tid = fake.add_order("pdd", ITEMS["pdd"])
    fake.orders[tid].refund_status = 3
    with pytest.raises(Transient, match="退款中"):
        await adapters["pdd"].deliver(tid, "k", [key(1)], "")
    assert fake.orders[tid].cards == []
    assert (await adapters["pdd"].get_order(tid)).status == "paid"  # still waiting
    fake.orders[tid].refund_status = 1  # the refund was refused
    await adapters["pdd"].deliver(tid, "k", [key(1)], "")
    assert fake.orders[tid].cards == [("CARD000001", "PWD-000001-XyZ")]

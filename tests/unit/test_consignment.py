"""Consignment (issue 17 item 3): a SKU sold from an Agiso card pool the agent keeps topped up
from the ledger, against the doc-built fake gateway (tests/fakes/agiso.py) on loopback.

The invariants checked after each scenario, on both ledgers: every key imported is free,
bound, consigned or void (nothing lost); the keys the ledger holds consigned are exactly the
pool's unsold cards of ours; every card the pool sold is bound to the line of the order it
went to; no key the pool holds or sold was ever delivered by the agent. The real daemon killed
under faults is tests/e2e/test_consignment_daemon.py."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent import lifecycle
from agent.alerts import Forecaster
from agent.config import (
    AlertSettings,
    Config,
    ConfigError,
    PlatformSettings,
    SkuSettings,
    load_config,
)
from agent.consignment import ConsignedSales, PoolKeeper, PoolPlatform, consigned_skus
from agent.domain import ACTIVE_STATES, CardItem, KeyState, LineState, PlatformOrder
from agent.platforms import agiso_client as client_module
from agent.platforms.agiso import AgisoOptions, AgisoPlatform
from agent.pool_domain import PoolAddState, PoolBounds
from agent.runtime import run_engine
from agent.stockcapacity import capacities
from agent.store.base import LedgerRefused, Store, StoreError
from agent.store.sqlite import SQLiteStore
from tests.conftest import make_config
from tests.fakes.agiso import FakeAgiso, ShiftedClock

APP_ID = "2024010112345678"
APP_SECRET = "agiso-app-secret-for-pool-tests"
TOKENS = {"taobao": "TbAldsPOOLTOKENtaobao0000000001", "xianyu": "AldsIdlePOOLTOKENxianyu0000001"}
POOLED = "3894069941929"  # GAME-100 on 淘宝: Agiso's pool delivers it
OWN = "3894069941930"  # VIP-30D on 淘宝: the agent delivers it
XY_ITEM = "669513624774"  # GAME-100 on 闲鱼: the agent delivers it
CPC = "551426"
NOW = 1_700_000_000.0


@pytest.fixture(autouse=True)
def fresh_app_state() -> Iterator[None]:
    client_module._APP_HOLDS.clear()
    client_module._LIMITERS.clear()
    yield
    client_module._APP_HOLDS.clear()
    client_module._LIMITERS.clear()


@pytest.fixture
async def fake() -> AsyncIterator[FakeAgiso]:
    server = FakeAgiso(APP_ID, APP_SECRET, seed=31, clock=ShiftedClock())
    for channel, token in TOKENS.items():
        server.add_shop(channel, token)
    server.link_pool(POOLED, CPC)
    await server.start()
    yield server
    await server.stop()


def tb_settings(fake: FakeAgiso, low: int = 5, high: int = 12, **options: Any) -> PlatformSettings:
    values: dict[str, Any] = {
        "channel": "taobao",
        "access_token_secret": "agiso.taobao.token",
        "products": {POOLED: "GAME-100", OWN: "VIP-30D"},
        "pools": {"GAME-100": PoolBounds(CPC, low, high)},
        "pool_interval": 0.2,
    }
    values.update(options)
    return PlatformSettings(
        name="tb",
        kind="agiso",
        base_url=fake.base_url,
        api_key=APP_ID,
        secret_name="agiso.app.secret",
        timeout=2.0,
        page_size=50,
        options=AgisoOptions(**values),
    )


def xy_settings(fake: FakeAgiso) -> PlatformSettings:
    return dataclasses.replace(
        tb_settings(fake),
        name="xy",
        options=AgisoOptions(
            channel="xianyu",
            access_token_secret="agiso.xianyu.token",
            products={XY_ITEM: "GAME-100"},
        ),
    )


def adapter(fake: FakeAgiso, low: int = 5, high: int = 12) -> AgisoPlatform:
    return AgisoPlatform(
        tb_settings(fake, low, high), APP_SECRET, TOKENS["taobao"], 8, clock=fake.clock
    )


@pytest.fixture
async def tb(fake: FakeAgiso) -> AsyncIterator[AgisoPlatform]:
    platform = adapter(fake)
    yield platform
    await platform.close()


def game_keys(count: int, start: int = 0) -> list[CardItem]:
    """Keys of GAME-100; every third one without a card number (a line without a comma)."""
    return [
        CardItem("" if i % 3 == 2 else f"GC{i:05d}", f"GP-{i:05d}-pool")
        for i in range(start, start + count)
    ]


async def imported(store: Store, sku: str, items: Sequence[CardItem]) -> None:
    report = await store.import_keys(sku, items, "test", time.time())
    assert report.added == len(items)


def as_item(card: tuple[str, str]) -> CardItem:
    """A pool card as our key: a number without a password is a key without a card number."""
    number, password = card
    return CardItem(number, password) if password else CardItem("", number)


async def keys_by_state(store: Store, sku: str) -> dict[KeyState, set[CardItem]]:
    return {state: set(await store.export_keys(sku, state)) for state in KeyState}


def agent_sent(fake: FakeAgiso) -> set[str]:
    """Every text a buyer got from the agent (淘宝 results and messages, 闲鱼 messages)."""
    texts: set[str] = set()
    for order in fake.orders.values():
        for result in order.results:
            texts |= {card["p"] or card["c"] for card in result}
        texts |= set(order.ww) | set(order.im) | {p or c for c, p in order.cards}
    return texts


async def check_invariants(
    store: Store, fake: FakeAgiso, imported_keys: dict[str, set[CardItem]], *, sold_recorded: bool
) -> dict[KeyState, int]:
    """The invariants of the module docstring; the figures per state."""
    figures = dict.fromkeys(KeyState, 0)
    pooled = {as_item(c) for cards in fake.pools.values() for c in cards}
    sold = {as_item(c): fake.sold_to[cpc, c[0]] for cpc, cards in fake.sold.items() for c in cards}
    sent_by_agent = agent_sent(fake)
    for sku, keys in imported_keys.items():
        states = await keys_by_state(store, sku)
        seen: set[CardItem] = set()
        for state, found in states.items():
            assert not found & seen, f"{sku}: a key in two states"
            seen |= found
            figures[state] += len(found)
        assert seen == keys, f"{sku}: keys lost {len(keys - seen)}"
        consigned = states[KeyState.CONSIGNED]
        ours_pooled = pooled & keys
        ours_sold = {k for k in sold if k in keys}
        if sold_recorded:
            assert consigned == ours_pooled, "consigned keys are not the pool's unsold cards"
        else:
            assert ours_pooled <= consigned <= ours_pooled | ours_sold
        for key in ours_pooled | ours_sold:
            assert key.secret not in sent_by_agent and not any(
                key.secret in text for text in sent_by_agent
            ), "a pool's key delivered by the agent too"
    for key, tid in sold.items():
        if not sold_recorded:
            continue
        [line] = await store.find_lines(tid)
        assert key in set(await store.bound_items(line.id)), f"{tid}: sold key not bound to it"
    return figures


# --- the keeper against the fake, on both ledgers ---------------------------------------------
async def test_pool_is_topped_up_from_the_ledger_and_drains_as_agiso_sells(
    store: Store, fake: FakeAgiso, tb: AgisoPlatform
) -> None:
    keys = game_keys(40)
    await imported(store, "GAME-100", keys)
    keeper = PoolKeeper(store, tb)
    await keeper.keep()
    assert len(fake.pools[CPC]) == 12  # up to high
    states = await keys_by_state(store, "GAME-100")
    assert states[KeyState.CONSIGNED] == {as_item(c) for c in fake.pools[CPC]}
    assert len(states[KeyState.FREE]) == 28
    [add] = await store.pool_adds("tb")
    assert (
        add.state is PoolAddState.ADDED
        and add.quantity == 12
        and add.reference.startswith("kami-pool-")
    )
    # Agiso sells 9 (the level falls to 3, under low 5): the next round adds 9 more.
    tids = [fake.add_order("taobao", POOLED, 1) for _ in range(9)]
    assert fake.sell_from_pools() == tids
    await keeper.keep()
    assert len(fake.pools[CPC]) == 12
    assert (await store.consigned_counts())["GAME-100"] == 21  # sales not recorded yet
    await check_invariants(store, fake, {"GAME-100": set(keys)}, sold_recorded=False)
    # The engine's side records each sale: the keys the send log names, bound to the line.
    sales = ConsignedSales(store, {"tb": tb}, time.time)
    line_ids = await store.ingest(
        "tb", [PlatformOrder(tid, "paid", "GAME-100", 1) for tid in tids], time.time()
    )
    for line_id in line_ids:
        line = await store.get_line(line_id)
        assert line is not None and sales.covers(line)
        await sales.settle(line)
    for tid in tids:
        [line] = await store.find_lines(tid)
        assert line.state is LineState.DELIVERED
        assert set(await store.bound_items(line.id)) == {
            as_item(c) for c in fake.orders[tid].pool_cards
        }
    assert (await store.consigned_counts())["GAME-100"] == 12
    figures = await check_invariants(store, fake, {"GAME-100": set(keys)}, sold_recorded=True)
    assert figures == {
        KeyState.FREE: 19,
        KeyState.BOUND: 9,
        KeyState.VOID: 0,
        KeyState.CONSIGNED: 12,
    }
    # Consigned keys are not the agent's to sell (stock sync), but stock still selling
    # (forecast).
    position = await store.stock_position(None)
    assert position.free["GAME-100"] == 19
    skus = {"GAME-100": SkuSettings(sku="GAME-100", max_quantity=1)}
    assert capacities(skus, position, {}, {})["GAME-100"] == 19


async def test_a_lost_add_answer_is_settled_with_the_same_keys(
    store: Store, fake: FakeAgiso, tb: AgisoPlatform
) -> None:
    keys = game_keys(30)
    await imported(store, "GAME-100", keys)
    keeper = PoolKeeper(store, tb)
    fake.faults.lose_after_change_rate = 1.0
    fake.faults.only = frozenset({"/CardPwd/Add"})
    await keeper.keep()  # added by Agiso, the answer lost
    [add] = await store.pool_adds("tb")
    assert add.state is PoolAddState.UNKNOWN
    consigned = (await keys_by_state(store, "GAME-100"))[KeyState.CONSIGNED]
    assert consigned == {as_item(c) for c in fake.pools[CPC]} and len(consigned) == 12
    fake.faults.lose_after_change_rate = 0.0
    await keeper.keep()  # the same 12 keys again: all refused as already there
    [add] = await store.pool_adds("tb")
    assert (add.state, add.added, add.refused) == (PoolAddState.ADDED, 0, 12)
    assert (await keys_by_state(store, "GAME-100"))[KeyState.CONSIGNED] == consigned
    adds = [c.outcome for c in fake.calls if c.path == "/CardPwd/Add"]
    assert adds == ["fault:lost", "ok"]  # no other add: the level is back within bounds

    # Killed between the call and its answer's commit: the intent is found open at the next
    # round and settled the same way, with no new keys and no partial.
    fake.add_order("taobao", POOLED, 8)
    fake.sell_from_pools()  # level 4
    pool = await store.ensure_pool("tb", CPC, "GAME-100", time.time())
    intent = await store.begin_pool_add(pool, 8, time.time())
    assert intent is not None
    await tb.add_to_pool(CPC, intent.items, intent.add.reference)  # then the kill
    before = len(fake.pools[CPC])
    await PoolKeeper(store, tb).keep()
    adds_now = await store.pool_adds("tb")
    assert [(a.state, a.added, a.refused) for a in adds_now[1:]] == [(PoolAddState.ADDED, 0, 8)]
    assert len(fake.pools[CPC]) == before == 12
    await check_invariants(store, fake, {"GAME-100": set(keys)}, sold_recorded=False)


async def test_an_add_agiso_partly_refuses_keeps_every_key_consigned(
    store: Store, fake: FakeAgiso, tb: AgisoPlatform
) -> None:
    keys = game_keys(20)
    await imported(store, "GAME-100", keys)
    # The merchant had typed the first key into the pool by hand: Agiso refuses it as a
    # repeated card number (AddFailCount 1), and its answer does not say which line failed.
    fake.pools[CPC].append(("GC00000", "GP-00000-pool"))
    keeper = PoolKeeper(store, tb)
    await keeper.keep()
    [add] = await store.pool_adds("tb")
    assert (add.state, add.added, add.refused) == (PoolAddState.PARTIAL, 10, 1)
    states = await keys_by_state(store, "GAME-100")
    assert len(states[KeyState.CONSIGNED]) == 11  # the refused one too: never free
    assert len(states[KeyState.FREE]) == 9
    await keeper.keep()  # the level is 12: nothing more, nothing added again
    assert len(await store.pool_adds("tb")) == 1
    await check_invariants(store, fake, {"GAME-100": set(keys)}, sold_recorded=True)

    # A pool refused for good on an add's first call: nothing went in, the keys are free.
    fake.closed_pools.add(CPC)
    fake.add_order("taobao", POOLED, 10)
    fake.sell_from_pools()  # level 2
    await keeper.keep()
    failed = (await store.pool_adds("tb"))[-1]
    assert failed.state is PoolAddState.FAILED
    assert len((await keys_by_state(store, "GAME-100"))[KeyState.FREE]) == 9


async def test_stock_back_returns_keys_to_free_and_an_unclear_one_is_added_again(
    store: Store, fake: FakeAgiso, tb: AgisoPlatform
) -> None:
    keys = game_keys(30)
    await imported(store, "GAME-100", keys)
    await PoolKeeper(store, tb).keep()
    lower = adapter(fake, low=2, high=6)
    try:
        fake.faults.lose_after_change_rate = 1.0
        fake.faults.only = frozenset({"/CardPwd/StockBack"})
        await PoolKeeper(store, lower).keep()  # 6 taken back by Agiso, every answer lost
        assert len(fake.pools[CPC]) == 12  # ... so added again: consigned for sure
        assert len((await keys_by_state(store, "GAME-100"))[KeyState.CONSIGNED]) == 12
        await check_invariants(store, fake, {"GAME-100": set(keys)}, sold_recorded=True)
        fake.faults.lose_after_change_rate = 0.0
        await PoolKeeper(store, lower).keep()
    finally:
        await lower.close()
    states = await keys_by_state(store, "GAME-100")
    assert len(fake.pools[CPC]) == 6 and len(states[KeyState.CONSIGNED]) == 6
    assert len(states[KeyState.FREE]) == 24
    await check_invariants(store, fake, {"GAME-100": set(keys)}, sold_recorded=True)


async def test_a_sale_of_keys_the_ledger_does_not_hold_consigned_is_parked(
    store: Store, fake: FakeAgiso, tb: AgisoPlatform
) -> None:
    keys = game_keys(15)
    await imported(store, "GAME-100", keys)
    await PoolKeeper(store, tb).keep()
    fake.pools[CPC].insert(0, ("BYHAND1", "BYHAND-PWD"))  # sold first: not ours
    tid = fake.add_order("taobao", POOLED, 2)
    fake.sell_from_pools()
    [line_id] = await store.ingest("tb", [PlatformOrder(tid, "paid", "GAME-100", 2)], NOW)
    line = await store.get_line(line_id)
    assert line is not None
    await ConsignedSales(store, {"tb": tb}, time.time).settle(line)
    line = await store.get_line(line_id)
    assert line is not None and line.state is LineState.NEEDS_ATTENTION
    assert line.reason and "1 not in this ledger" in line.reason
    # The key of ours that went to this buyer is bound to the line all the same.
    assert len(await store.bound_items(line_id)) == 1


async def test_a_consigned_key_cannot_move_outside_the_table(store: Store) -> None:
    await imported(store, "GAME-100", game_keys(2))
    pool = await store.ensure_pool("tb", CPC, "GAME-100", NOW)
    intent = await store.begin_pool_add(pool, 1, NOW)
    assert intent is not None
    assert not lifecycle.allowed(KeyState, KeyState.CONSIGNED, KeyState.VOID)
    with pytest.raises(LedgerRefused, match="not an allowed transition"):
        await store._write(  # type: ignore[attr-defined]
            lambda tx: tx.execute(
                "UPDATE card_keys SET state = 'void', void_reason = 'x', pool_add_id = NULL"
                " WHERE id = $1",
                intent.key_ids[0],
            )
        )
    with pytest.raises(LedgerRefused):  # a consigned key names its add
        await store._write(  # type: ignore[attr-defined]
            lambda tx: tx.execute(
                "UPDATE card_keys SET state = 'consigned' WHERE state = 'free'",
            )
        )
    await store.pool_add_deferred(intent.add.id, "lost", unclear=True, now=NOW)
    assert await store.finish_pool_add(intent.add.id, 1, 1, 0, True, NOW) is PoolAddState.ADDED
    with pytest.raises(LedgerRefused, match="not an allowed transition"):
        await store._write(  # type: ignore[attr-defined]
            lambda tx: tx.execute(
                "UPDATE pool_adds SET state = 'failed' WHERE id = $1", intent.add.id
            )
        )
    with pytest.raises(StoreError, match="holds keys of"):
        await store.ensure_pool("tb", CPC, "VIP-30D", NOW)


async def test_a_buyer_notice_to_an_agiso_shop_is_not_an_error(tb: AgisoPlatform) -> None:
    # agent/buyer.py passes the notice's idempotency key: the adapter took two arguments.
    await tb.notice("3000000000001", "waiting for stock", "kami-notice-1")


def test_design_doc_shows_the_key_and_pool_tables() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "design.md").read_text(encoding="utf-8")
    for kind in (KeyState, PoolAddState):
        assert f"```mermaid\n{lifecycle.mermaid(kind)}```" in doc, kind.__name__


# --- config ---------------------------------------------------------------------------------
def _config(tmp_path: Path, pools: str, channel: str = "taobao") -> Config:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[store]
path = "kami.db"

[platforms.tb]
kind = "agiso"
base_url = "https://gw-api.agiso.com"
api_key = "{APP_ID}"
secret = "agiso.app.secret"
access_token = "agiso.taobao.token"
channel = "{channel}"

[platforms.tb.products]
"{POOLED}" = "GAME-100"

[platforms.tb.pools]
{pools}

[skus."GAME-100"]
""",
        encoding="utf-8",
    )
    return load_config(path)


def test_pools_are_read_from_the_config(tmp_path: Path) -> None:
    config = _config(tmp_path, '"GAME-100" = { cpc_id = "551426", low = 20, high = 100 }')
    options = config.platforms[0].options
    assert isinstance(options, AgisoOptions)
    assert options.pools == {"GAME-100": PoolBounds("551426", 20, 100)}
    for pools, channel, message in (
        ('"GAME-100" = { cpc_id = "551426", low = 20, high = 10 }', "taobao", "above high"),
        ('"GAME-100" = { cpc_id = "55x", low = 1, high = 10 }', "taobao", "卡种ID"),
        ('"OTHER" = { cpc_id = "551426", low = 1, high = 10 }', "taobao", "not a SKU"),
        ('"GAME-100" = { cpc_id = "551426", low = 1, hi = 10 }', "taobao", "not a pool setting"),
        ('"GAME-100" = { cpc_id = "551426", low = 1, high = 10 }', "jd", "read back"),
    ):
        with pytest.raises(ConfigError, match=message):
            _config(tmp_path, pools, channel)


def test_the_chinese_consignment_example_is_a_valid_config(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs/platforms/agiso.md").read_text(
        encoding="utf-8"
    )
    setup, pools = [b.split("```", 1)[0] for b in text.split("```toml\n")[1:3]]
    lines = [line.removeprefix("   ") for line in (setup + pools).splitlines()]
    path = tmp_path / "config.toml"
    path.write_text('[store]\npath = "kami.db"\n\n' + "\n".join(lines), encoding="utf-8")
    options = load_config(path).platforms[0].options
    assert isinstance(options, AgisoOptions)
    assert options.pools == {"GAME-100": PoolBounds("551426", 20, 100)}


# --- both paths at once, the real engine in-process ------------------------------------------
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


async def settle(condition: Any, what: str, guard: float = 120.0) -> None:
    deadline = time.monotonic() + guard
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_engine_delivers_its_orders_while_agiso_sells_the_pool_and_no_key_goes_twice(
    tmp_path: Path, fake: FakeAgiso, sqlite_store: Store
) -> None:
    """淘宝 GAME-100 from the pool, 淘宝 VIP-30D and 闲鱼 GAME-100 by the agent, at once,
    under faults on every call."""
    store = sqlite_store
    game, vip = game_keys(150), [CardItem(f"VC{i:04d}", f"VP-{i:04d}-own") for i in range(60)]
    await imported(store, "GAME-100", game)
    await imported(store, "VIP-30D", vip)
    config = make_config(tmp_path, fake.base_url, reconcile_interval=2.0, poll_interval=0.5)
    config = dataclasses.replace(
        config,
        platforms=(tb_settings(fake, low=6, high=15), xy_settings(fake)),
        skus={s: SkuSettings(sku=s, max_quantity=10) for s in ("GAME-100", "VIP-30D")},
        alerts=AlertSettings(forecast_interval=0.2),
    )
    platforms = {
        "tb": AgisoPlatform(
            config.platforms[0], APP_SECRET, TOKENS["taobao"], 16, clock=fake.clock
        ),
        "xy": AgisoPlatform(
            config.platforms[1], APP_SECRET, TOKENS["xianyu"], 16, clock=fake.clock
        ),
    }
    assert consigned_skus(platforms["tb"]) == {"GAME-100"} and isinstance(
        platforms["tb"], PoolPlatform
    )
    assert consigned_skus(platforms["xy"]) == frozenset()
    fake.faults.allow_retry_rate = 0.05
    fake.faults.error_before_rate = 0.03
    fake.faults.lose_after_change_rate = 0.08
    pooled = [fake.add_order("taobao", POOLED, 1 + n % 2) for n in range(30)]
    own = [fake.add_order("taobao", OWN, 1 + n % 3) for n in range(15)]
    xianyu = [fake.add_order("xianyu", XY_ITEM, 1 + n % 2) for n in range(20)]
    everything = pooled + own + xianyu

    async def agiso_sells() -> None:  # Agiso's own auto-delivery, and its pushes
        while True:
            for tid in fake.sell_from_pools():
                query, form = fake.autosend_push(tid)
                await platforms["tb"].accept_push(query, form)
            await asyncio.sleep(0.05)

    async def settled() -> bool:
        counts = await store.count_by_state()
        lines = sum(counts.values())
        return lines == len(everything) and not any(s in ACTIVE_STATES for s in counts)

    async with running(config, store, platforms):
        seller = asyncio.create_task(agiso_sells())
        try:
            for tid in xianyu:
                query, form = fake.push(tid)
                await platforms["xy"].accept_push(query, form)
            await settle(settled, "every order delivered or recorded")
        finally:
            seller.cancel()
            await asyncio.gather(seller, return_exceptions=True)
        forecasts = await Forecaster(config, store, time.time).forecast({})
    for tid in pooled:
        [line] = await store.find_lines(tid)
        assert line.state is LineState.DELIVERED, (tid, line.state, line.reason)
        bound = set(await store.bound_items(line.id))
        assert bound == {as_item(c) for c in fake.orders[tid].pool_cards}
        assert not fake.orders[tid].results and not fake.orders[tid].ww  # nothing from the agent
    for tid in own + xianyu:
        [line] = await store.find_lines(tid)
        if line.state is LineState.NEEDS_ATTENTION:  # 闲鱼: a message outcome unknown
            assert line.reason and "未知" in line.reason, line.reason
            continue
        assert line.state is LineState.DELIVERED, (tid, line.state, line.reason)
        assert not fake.orders[tid].pool_cards
    figures = await check_invariants(
        store, fake, {"GAME-100": set(game), "VIP-30D": set(vip)}, sold_recorded=True
    )
    [game_forecast] = [f for f in forecasts if f.sku == "GAME-100"]
    assert game_forecast.consigned == figures[KeyState.CONSIGNED] > 0
    adds = await store.pool_adds("tb")
    faults = sorted({c.outcome for c in fake.calls if c.outcome.startswith("fault")})
    print(
        f"consignment e2e: {len(pooled)} pooled orders recorded, {len(own) + len(xianyu)} by the"
        f" agent; keys { ({k.value: v for k, v in figures.items()}) }; pool adds"
        f" {[a.state.value for a in adds]}; faults {faults}"
    )


async def test_a_parked_consigned_line_retried_is_never_delivered_by_the_agent(
    sqlite_store: Store, fake: FakeAgiso, tb: AgisoPlatform, tmp_path: Path
) -> None:
    store = sqlite_store
    await imported(store, "GAME-100", game_keys(10))
    tid = fake.add_order("taobao", POOLED, 1)  # the pool is empty: Agiso waits
    config = make_config(tmp_path, fake.base_url)
    config = dataclasses.replace(
        config,
        platforms=(tb_settings(fake, low=0, high=0),),
        skus={"GAME-100": SkuSettings(sku="GAME-100", max_quantity=10)},
    )
    platform = AgisoPlatform(config.platforms[0], APP_SECRET, TOKENS["taobao"], 8, clock=fake.clock)
    async with running(config, store, {"tb": platform}):

        async def taken() -> bool:
            return bool(await store.find_lines(tid))

        await settle(taken, "the order listed")
        [line] = await store.find_lines(tid)
        await store.park(line.id, "test", time.time())
        await store.retry_line(line.id, time.time())
        await asyncio.sleep(1.0)  # several sweeps
    [line] = await store.find_lines(tid)
    assert line.state is LineState.NEW and not await store.bound_items(line.id)
    assert not fake.orders[tid].results
    assert isinstance(store, SQLiteStore)

"""After-sales and stock tools on both ledgers (issue 19): keys voided by mistake returned to
stock, key expiry, a parked order retried with what the platform says now, a bad key replaced
on a delivered order, a merchant's refund, buyer limits, delayed delivery, templates."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time
from pathlib import Path

import pytest

from agent.config import Config, ConfigError, SkuSettings, load_config
from agent.domain import (
    AlertCondition,
    CardItem,
    DeliveryIntent,
    LineState,
    OrderLine,
    PlatformOrder,
    RejectedOrder,
)
from agent.intake import screen_order
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store, StoreError
from agent.store.sqlite import SQLiteStore
from tests.conftest import keys, make_config, master_key_for_tests, stock
from tests.helpers import delivered_all, line_state_is, running_agent, wait_for
from tests.unit.test_cli import cli, config_for

NOW = 1_700_000_000.0
SKU = "GAME-100"


def order(
    order_id: str, sku: str = SKU, quantity: int = 1, buyer: str | None = None
) -> PlatformOrder:
    return PlatformOrder(
        order_id=order_id, status="paid", sku=sku, quantity=quantity, buyer_contact=buyer
    )


def counts(found: list[object]) -> dict[str, tuple[int, int, int]]:
    return {c.sku: (c.free, c.bound, c.void) for c in found}  # type: ignore[attr-defined]


# --- item 1: unvoid ----------------------------------------------------------------------------
async def test_unvoid_returns_only_keys_voided_with_that_reason(store: Store) -> None:
    await stock(store, SKU, 6)
    assert await store.void_free_keys(SKU, 3, "oops", NOW) == 3
    assert await store.void_free_keys(SKU, 1, "leaked", NOW) == 1
    assert counts(await store.stock_counts())[SKU] == (2, 0, 4)
    assert await store.unvoid_keys(SKU, "oop", None, NOW) == 0  # the reason must match
    assert await store.unvoid_keys("OTHER", "oops", None, NOW) == 0
    assert await store.unvoid_keys(SKU, "oops", 2, NOW) == 2
    assert await store.unvoid_keys(SKU, "oops", None, NOW) == 1
    assert counts(await store.stock_counts())[SKU] == (5, 0, 1)
    with pytest.raises(StoreError):
        await store.unvoid_keys(SKU, "leaked", 0, NOW)
    # The keys returned deliver like any other.
    (line_id,) = await store.ingest("main", [order("A", quantity=5)], NOW)
    assert (await store.allocate(line_id, NOW)).state == LineState.ALLOCATED


def test_stock_unvoid_command(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    path = tmp_path / "keys.txt"
    path.write_text("".join(f"K-{i:03}\n" for i in range(5)), encoding="utf-8")
    assert cli(config, "stock", "import", SKU, str(path)).returncode == 0
    assert cli(config, "stock", "void", SKU, "--count", "4", "--reason", "oops").returncode == 0
    none = cli(config, "stock", "unvoid", SKU, "--reason", "other")
    assert none.returncode == 1 and "Traceback" not in none.stderr
    back = cli(config, "stock", "unvoid", SKU, "--reason", "oops", "--count", "3")
    assert back.returncode == 0, back.stderr
    assert "3 key(s)" in back.stdout
    listing = cli(config, "stock", "list").stdout.splitlines()
    assert next(ln.split() for ln in listing if ln.startswith(SKU))[:4] == [SKU, "4", "0", "1"]


# --- item 2: key expiry ------------------------------------------------------------------------
def dated(sku: str, count: int, start: int, expires_at: float | None) -> list[CardItem]:
    return [
        CardItem(code=k.code, secret=k.secret, expires_at=expires_at)
        for k in keys(sku, count, start)
    ]


async def test_expired_keys_are_never_bound_nor_counted_as_stock(store: Store) -> None:
    now = time.time()
    await store.import_keys(SKU, dated(SKU, 2, 0, now - 60), "test", now)  # expired
    await store.import_keys(SKU, dated(SKU, 1, 10, now + 3600), "test", now)
    await store.import_keys(SKU, dated(SKU, 1, 20, None), "test", now)
    (count,) = await store.stock_counts()
    assert (count.free, count.bound, count.void, count.expired) == (2, 0, 0, 2)
    assert await store.free_counts() == {SKU: 2}
    assert (await store.stock_position(None)).free == {SKU: 2}
    # Intake's set-wise claim: 3 keys wanted, only 2 may be sold.
    (big,) = await store.take_in("main", [order("BIG", quantity=3)], now, {SKU})
    assert isinstance(big, OrderLine) and big.state == LineState.BACKORDERED
    # 4 free keys, 2 of them sellable: the sweep does not offer it a worker.
    assert big.id not in [ln.id for ln in await store.due_lines(now, 10)]
    # A line that fits takes the keys still valid, at intake...
    (claimed,) = await store.take_in("main", [order("A", quantity=1)], now, {SKU})
    assert isinstance(claimed, DeliveryIntent)
    # ...and through allocation.
    (line_id,) = await store.ingest("main", [order("B")], now)
    assert (await store.allocate(line_id, now)).state == LineState.ALLOCATED
    sent = {i.code for i in claimed.items} | {i.code for i in await store.bound_items(line_id)}
    assert sent == {f"{SKU}-10", f"{SKU}-20"}
    (count,) = await store.stock_counts()
    assert (count.free, count.bound, count.expired) == (0, 2, 2)


def test_stock_files_expiry_is_stored_and_expired_keys_are_listed(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    path = tmp_path / "keys.csv"
    path.write_text("code,secret,expiry\nC1,S1,2099-12-31\nC2,S2,\n", encoding="utf-8")
    result = cli(config, "stock", "import", SKU, str(path))
    assert result.returncode == 0, result.stderr
    assert "not stored" not in result.stdout
    with sqlite3.connect(tmp_path / "kami.db") as conn:
        stored = sorted(r[0] or 0 for r in conn.execute("SELECT expires_at FROM card_keys"))
    assert stored[0] == 0 and stored[1] > time.time() + 365 * 86400

    async def add_expired() -> None:
        s = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
        await s.open()
        try:
            await s.import_keys(SKU, dated(SKU, 3, 0, time.time() - 1), "test", time.time())
        finally:
            await s.close()

    asyncio.run(add_expired())
    listing = cli(config, "stock", "list").stdout.splitlines()
    assert listing[0].split()[-1] == "expired"
    assert next(ln.split() for ln in listing if ln.startswith(SKU)) == [SKU, "2", "0", "0", "3"]
    as_json = json.loads(cli(config, "stock", "list", "--json").stdout)
    assert as_json[0]["free"] == 2 and as_json[0]["expired"] == 3


# --- item 3: unknown SKU orders keep their quantity; retry reads the order again ---------------
async def test_a_parked_unknown_sku_order_is_retried_as_the_platform_states_it(
    tmp_path: Path, sandbox: SandboxPlatform
) -> None:
    config = await asyncio.to_thread(config_for, tmp_path, sandbox.base_url)
    sandbox.add_order("NEW-SKU", 2, order_id="77")
    sandbox.add_order("NEW-SKU", 9, order_id="78")  # over max_quantity once the SKU exists
    store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests())
    await store.open()
    try:
        skus = load_config(config).skus
        page = [PlatformOrder(o, "paid", "NEW-SKU", q) for o, q in (("77", 2), ("78", 9))]
        screened = [screen_order(o, skus) for o in page]
        await store.ingest("main", [s for s in screened if s is not None], time.time())
        (parked,) = await store.find_lines("77")
        assert parked.state == LineState.NEEDS_ATTENTION and parked.quantity == 2
        # The ledger itself refuses to send back to work a line parked with no quantity.
        await store.ingest("main", [RejectedOrder("79", "unknown SKU", sku="X")], time.time())
        (unknown,) = await store.find_lines("79")
        with pytest.raises(StoreError, match="quantity"):
            await store.retry_line(unknown.id, time.time())
    finally:
        await store.close()
    with config.open("a", encoding="utf-8") as handle:
        handle.write('\n[skus."NEW-SKU"]\nmax_quantity = 5\n')
    sandbox.orders["77"].data["quantity"] = 3  # the platform's word now
    retried = await asyncio.to_thread(cli, config, "orders", "retry", "77", secret=sandbox.secret)
    assert retried.returncode == 0, retried.stderr
    still = await asyncio.to_thread(cli, config, "orders", "retry", "78", secret=sandbox.secret)
    assert still.returncode == 1 and "max_quantity" in still.stderr
    shown = await asyncio.to_thread(cli, config, "orders", "list", "--json")
    lines = {ln["order_id"]: ln for ln in json.loads(shown.stdout)}
    assert (lines["77"]["state"], lines["77"]["sku"], lines["77"]["quantity"]) == (
        "new",
        "NEW-SKU",
        3,
    )
    assert (lines["78"]["state"], lines["78"]["quantity"]) == ("needs_attention", 9)
    assert "max_quantity" in lines["78"]["reason"]


# --- item 4: the cross-SKU refusal names the other SKU -----------------------------------------
async def test_an_import_refused_under_another_sku_names_it(store: Store) -> None:
    await store.import_keys("GAME-A", keys("K", 3), "test", NOW)
    await store.import_keys("GAME-B", keys("K", 2, 10), "test", NOW)
    mixed = keys("K", 3) + keys("K", 2, 10) + keys("K", 1, 20)
    report = await store.import_keys(SKU, mixed, "test", NOW)
    assert (report.added, report.other_sku) == (1, 5)
    assert report.other_skus == ("GAME-A", "GAME-B")


def test_the_import_report_names_the_other_sku(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    with config.open("a", encoding="utf-8") as handle:
        handle.write('\n[skus."GAME-200"]\n')
    path = tmp_path / "keys.txt"
    path.write_text("K-1\nK-2\n", encoding="utf-8")
    assert cli(config, "stock", "import", "GAME-200", str(path)).returncode == 0
    again = cli(config, "stock", "import", SKU, str(path))
    assert again.returncode == 0, again.stderr
    assert "refused 2 key(s) this ledger holds under another SKU: GAME-200" in again.stdout


# --- item 5: buyer rules, delayed delivery, message templates (the running engine) -------------
def shop(tmp_path: Path, base_url: str, **sku: object) -> Config:
    config = make_config(tmp_path, base_url, buyer_limit=3, blocked_buyers=("Bad@Example.test",))
    skus = dict(config.skus)
    skus[SKU] = SkuSettings(sku=SKU, max_quantity=10, **sku)  # type: ignore[arg-type]
    return dataclasses.replace(config, skus=skus)


async def test_blocked_buyers_and_buyer_limits_are_parked_at_intake(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    await stock(store, SKU, 20)
    config = shop(tmp_path, sandbox.base_url, buyer_limit=2)
    buyer = {"buyer": {"contact": "fan@example.test"}}
    first = sandbox.add_order(SKU, 2, **buyer)
    over_sku = sandbox.add_order(SKU, 1, **buyer)  # a third key of the SKU: over its limit
    other = sandbox.add_order("VIP-30D", 1, **buyer)  # the third key in all: allowed
    over_all = sandbox.add_order("VIP-30D", 1, **buyer)  # a fourth: over [agent] buyer_limit
    blocked = sandbox.add_order(SKU, 1, buyer={"contact": " bad@example.TEST "})
    await stock(store, "VIP-30D", 5)
    async with running_agent(config, store, sandbox):
        await wait_for(delivered_all(sandbox, [first, other]), "deliveries")
        for order_id in (over_sku, over_all, blocked):
            await wait_for(line_state_is(store, order_id, LineState.NEEDS_ATTENTION), order_id)
    reasons = {
        o: (await store.find_lines(o))[0].reason or "" for o in (over_sku, over_all, blocked)
    }
    assert "buyer_limit 2" in reasons[over_sku] and f"[skus.{SKU}]" in reasons[over_sku]
    assert "[agent] buyer_limit 3" in reasons[over_all]
    assert "blocked" in reasons[blocked]
    assert all(sandbox.orders[o].delivery is None for o in reasons)
    assert "fan@example" not in " ".join(reasons.values())  # no contact in the reasons


async def test_a_delayed_sku_waits_before_its_keys_are_sent(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    await stock(store, SKU, 2)
    now = time.time()
    (waiting,) = await store.take_in("main", [order("D1")], now, set(), {SKU: 600.0})
    assert isinstance(waiting, OrderLine) and waiting.next_attempt_at == now + 600
    assert await store.due_lines(now + 1, 10) == []
    assert [ln.id for ln in await store.due_lines(now + 601, 10)] == [waiting.id]
    config = shop(tmp_path, sandbox.base_url, delay=1.0)
    order_id = sandbox.add_order(SKU, 1)
    async with running_agent(config, store, sandbox):
        await wait_for(line_state_is(store, order_id, LineState.NEW), "intake")
        (line,) = await store.find_lines(order_id)
        assert line.next_attempt_at >= line.seen_at + 1.0
        assert sandbox.orders[order_id].delivery is None  # not at once
        await wait_for(delivered_all(sandbox, [order_id]), "the delayed delivery")
    (line,) = await store.find_lines(order_id)
    assert line.delivered_at is not None and line.delivered_at >= line.seen_at + 1.0


async def test_a_delayed_line_short_of_stock_waits_for_stock_not_every_sweep(store: Store) -> None:
    # Its delay (next_attempt_at) is spent once the line is taken up: backordered for want of
    # keys, it waits for stock like any other, not taken up again at every sweep (where it
    # came before newer lines due, and a sale of such lines filled the sweep's every batch).
    now = time.time()
    (waiting,) = await store.take_in("main", [order("D2")], now, set(), {SKU: 5.0})
    assert isinstance(waiting, OrderLine)
    line = await store.claim_for_delivery(waiting.id, now + 6)
    assert isinstance(line, OrderLine) and line.state == LineState.BACKORDERED
    assert await store.due_lines(now + 7, 10) == []
    await stock(store, SKU, 1)
    assert [ln.id for ln in await store.due_lines(now + 8, 10)] == [waiting.id]


async def test_delivery_messages_are_templates(
    tmp_path: Path, sandbox: SandboxPlatform, store: Store
) -> None:
    await stock(store, SKU, 2)
    template = "订单 {订单号} / {sku} x{数量}\n卡密：{卡密}\n{{ok}}"
    config = shop(tmp_path, sandbox.base_url, message=template)
    order_id = sandbox.add_order(SKU, 2)
    async with running_agent(config, store, sandbox):
        await wait_for(delivered_all(sandbox, [order_id]), "delivery")
    delivery = sandbox.orders[order_id].delivery
    assert delivery is not None
    secrets = [item["secret"] for item in delivery["items"]]
    expected = f"订单 {order_id} / {SKU} x2\n卡密：{secrets[0]}\n卡密：{secrets[1]}\n{{ok}}"
    assert delivery["message"] == expected


def test_a_template_with_an_unknown_variable_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[store]\npath = "kami.db"\n[platforms.main]\nbase_url = "http://127.0.0.1:9"\n'
        'api_key = "k"\nsecret = "s"\n[skus."A"]\nmessage = "hi {name}"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"skus\.A.*message.*unknown variable"):
        load_config(path)


# --- item 6: the history of closed alerts ------------------------------------------------------
async def test_every_closed_alert_is_kept(store: Store) -> None:
    low = AlertCondition("low_stock:A", "low_stock", "warning", "A runs out in 10 min")
    for n in range(2):  # fires, clears, fires again, clears again
        await store.apply_alerts([low], ["log"], NOW + 10 * n, 3600, 3)
        await store.apply_alerts([], ["log"], NOW + 10 * n + 5, 3600, 3)
    closed = await store.closed_alerts(10)
    assert [(a.key, a.opened_at, a.resolved_at) for a in closed] == [
        ("low_stock:A", NOW + 10, NOW + 15),
        ("low_stock:A", NOW, NOW + 5),
    ]
    assert await store.open_alerts() == []

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path

import pytest

from agent.domain import (
    CardItem,
    DeliveryIntent,
    KeyState,
    LineState,
    OrderLine,
    PlatformOrder,
    RejectedOrder,
)
from agent.keybox import StoreKeyError
from agent.store.base import Store, StoreError
from agent.store.identity import Opening
from agent.store.sqlite import SQLiteStore, migrations
from tests.conftest import keys, master_key_for_tests, stock
from tests.helpers import ledger_bytes

NOW = 1_700_000_000.0


def order(order_id: str, sku: str = "GAME-100", quantity: int = 1) -> PlatformOrder:
    return PlatformOrder(order_id=order_id, status="paid", sku=sku, quantity=quantity)


async def test_ledger_file_is_private_and_migrated(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    mode = stat.S_IMODE((tmp_path / "kami.db").stat().st_mode)
    assert mode == 0o600
    with sqlite3.connect(tmp_path / "kami.db") as conn:
        latest = max(version for version, _ in migrations())
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == latest
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_reopen_does_not_migrate_twice(tmp_path: Path) -> None:
    for opening in (Opening.CREATE, Opening.OPEN):
        s = SQLiteStore(tmp_path / "kami.db", master_key_for_tests(), opening=opening)
        await s.open()
        await s.close()
    with sqlite3.connect(tmp_path / "kami.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == len(
            migrations()
        )


async def test_ingest_is_idempotent(store: Store) -> None:
    first = await store.ingest("main", [order("A"), order("B")], NOW)
    again = await store.ingest("main", [order("A"), order("B"), order("C")], NOW)
    assert len(first) == 2
    assert len(again) == 1
    other_platform = await store.ingest("other", [order("A")], NOW)
    assert len(other_platform) == 1


async def test_rejected_order_is_parked_with_reason(store: Store) -> None:
    ready = await store.ingest("main", [RejectedOrder("X", "quantity must be at least 1")], NOW)
    assert ready == []
    (line,) = await store.find_lines("X")
    assert line.state == LineState.NEEDS_ATTENTION
    assert line.reason == "quantity must be at least 1"


async def test_conflicting_duplicate_is_parked(store: Store) -> None:
    (line_id,) = await store.ingest("main", [order("A", quantity=1)], NOW)
    await store.ingest("main", [order("A", quantity=3)], NOW)
    line = await store.get_line(line_id)
    assert line is not None and line.state == LineState.NEEDS_ATTENTION
    assert "different content" in (line.reason or "")


async def test_allocate_binds_distinct_keys_per_quantity(store: Store) -> None:
    await stock(store, "GAME-100", 5)
    (line_id,) = await store.ingest("main", [order("A", quantity=3)], NOW)
    line = await store.allocate(line_id, NOW)
    assert line.state == LineState.ALLOCATED
    intent = await store.begin_delivery(line_id, NOW)
    assert len({item.secret for item in intent.items}) == 3
    assert intent.line.state == LineState.DELIVERING
    counts = {c.sku: c for c in await store.stock_counts()}
    assert (counts["GAME-100"].free, counts["GAME-100"].bound) == (2, 3)


async def test_allocation_is_all_or_nothing(store: Store) -> None:
    await stock(store, "GAME-100", 2)
    (line_id,) = await store.ingest("main", [order("A", quantity=3)], NOW)
    line = await store.allocate(line_id, NOW)
    assert line.state == LineState.BACKORDERED
    assert (await store.stock_counts())[0].free == 2
    assert [ln.id for ln in await store.due_lines(NOW, 10)] == []  # nothing to do yet
    await stock(store, "GAME-100", 1, start=100)
    assert [ln.id for ln in await store.due_lines(NOW, 10)] == [line_id]
    assert (await store.allocate(line_id, NOW)).state == LineState.ALLOCATED


async def test_delivery_key_is_deterministic_and_resend_changes_it(store: Store) -> None:
    await stock(store, "GAME-100", 1)
    (line_id,) = await store.ingest("main", [order("A")], NOW)
    await store.allocate(line_id, NOW)
    first = await store.begin_delivery(line_id, NOW)
    second = await store.begin_delivery(line_id, NOW + 1)
    assert first.idempotency_key == second.idempotency_key
    assert first.items == second.items
    assert second.line.attempts == 2
    await store.mark_delivered(line_id, NOW, "ok")
    await store.resend_line(line_id, NOW)
    third = await store.begin_delivery(line_id, NOW + 2)
    assert third.idempotency_key != first.idempotency_key
    assert third.items == first.items


async def test_bound_key_never_returns_to_free(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    await stock(sqlite_store, "GAME-100", 1)
    (line_id,) = await sqlite_store.ingest("main", [order("A")], NOW)
    await sqlite_store.allocate(line_id, NOW)
    await sqlite_store.park(line_id, "operator check", NOW)
    await sqlite_store.close()
    conn = sqlite3.connect(tmp_path / "kami.db")
    with pytest.raises(sqlite3.IntegrityError, match="bound card key"):
        conn.execute("UPDATE card_keys SET state = 'free', order_line_id = NULL, slot = NULL")
    with pytest.raises(sqlite3.IntegrityError, match="never deleted"):
        conn.execute("DELETE FROM card_keys")
    conn.close()
    await sqlite_store.open()


async def test_a_key_cannot_fill_two_slots_or_two_lines(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    await stock(sqlite_store, "GAME-100", 2)
    a, _ = await sqlite_store.ingest("main", [order("A"), order("B")], NOW)
    await sqlite_store.allocate(a, NOW)
    await sqlite_store.close()
    conn = sqlite3.connect(tmp_path / "kami.db")
    with pytest.raises(sqlite3.IntegrityError):
        # second free key into A's slot 0: the (order_line_id, slot) constraint refuses
        conn.execute(
            "UPDATE card_keys SET state='bound', order_line_id=?, slot=0 WHERE state='free'", (a,)
        )
    conn.close()
    await sqlite_store.open()


async def test_import_dedupes_and_counts(store: Store) -> None:
    items = keys("GAME-100", 10) + keys("GAME-100", 5)  # 5 duplicates within the import
    seen: list[int] = []
    report = await store.import_keys("GAME-100", items, "test", NOW, seen.append)
    assert (report.added, report.duplicates) == (10, 5)
    assert seen[-1] == 15
    again = await store.import_keys("GAME-100", keys("GAME-100", 10), "test", NOW)
    assert (again.added, again.duplicates) == (0, 10)
    other = await store.import_keys("VIP-30D", keys("GAME-100", 10), "test", NOW)
    # A key is unique across SKUs (DESIGN, invariant 1): under two it would be sold twice.
    assert (other.added, other.duplicates, other.other_sku) == (0, 0, 10)


async def test_void_only_touches_free_keys_and_needs_reason(store: Store) -> None:
    await stock(store, "GAME-100", 4)
    (line_id,) = await store.ingest("main", [order("A")], NOW)
    await store.allocate(line_id, NOW)
    with pytest.raises(StoreError):
        await store.void_free_keys("GAME-100", None, " ", NOW)
    assert await store.void_free_keys("GAME-100", 2, "leaked", NOW) == 2
    assert await store.void_free_keys("GAME-100", None, "leaked", NOW) == 1
    (count,) = await store.stock_counts()
    assert (count.free, count.bound, count.void) == (0, 1, 3)


async def test_retry_after_attention_resumes_in_the_right_state(store: Store) -> None:
    await stock(store, "GAME-100", 1)
    a, b = await store.ingest("main", [order("A"), order("B", sku="VIP-30D")], NOW)
    await store.allocate(a, NOW)
    await store.begin_delivery(a, NOW)
    await store.park(a, "conflict", NOW)
    await store.park(b, "unknown sku", NOW)
    resumed = await store.retry_line(a, NOW)
    assert resumed.state == LineState.DELIVERING and resumed.ambiguous
    assert (await store.retry_line(b, NOW)).state == LineState.NEW
    with pytest.raises(StoreError, match="only needs_attention"):
        await store.retry_line(a, NOW)


async def test_events_form_an_audit_trail(store: Store) -> None:
    await stock(store, "GAME-100", 1)
    (line_id,) = await store.ingest("main", [order("A")], NOW)
    await store.allocate(line_id, NOW)
    await store.begin_delivery(line_id, NOW)
    await store.mark_delivered(line_id, NOW, "ok")
    kinds = [e.kind for e in await store.events(line_id)]
    assert kinds == ["intake", "allocated", "delivery_intent", "delivered"]
    trail = " ".join(e.detail for e in await store.events(line_id))
    assert "S-GAME-100" not in trail  # fingerprints only


async def test_take_in_claims_new_local_lines_as_it_records_them(store: Store) -> None:
    await stock(store, "GAME-100", 3)
    page = [
        order("A", quantity=2),
        order("B", sku="VIP-30D"),  # not sold from local stock only: left to the worker
        order("C", quantity=2),  # one key left: backordered
        RejectedOrder("X", "quantity must be at least 1"),
    ]
    taken = await store.take_in("main", page, NOW, {"GAME-100"})
    intent, vip, short = taken
    assert isinstance(intent, DeliveryIntent)
    assert intent.idempotency_key.startswith("kami-") and intent.idempotency_key.endswith("-0")
    assert len({item.secret for item in intent.items}) == 2
    assert (intent.line.state, intent.line.attempts) == (LineState.DELIVERING, 1)
    assert await store.get_line(intent.line.id) == intent.line
    assert isinstance(vip, OrderLine) and vip.state == LineState.NEW
    assert isinstance(short, OrderLine) and short.state == LineState.BACKORDERED
    (parked,) = await store.find_lines("X")
    assert parked.state == LineState.NEEDS_ATTENTION
    kinds = [e.kind for e in await store.events(intent.line.id)]
    assert kinds == ["intake", "allocated", "delivery_intent"]
    counts = {c.sku: c for c in await store.stock_counts()}
    assert (counts["GAME-100"].free, counts["GAME-100"].bound) == (1, 2)
    # After a crash, the worker sends the same keys under the same idempotency key.
    again = await store.begin_delivery(intent.line.id, NOW + 1)
    assert (again.idempotency_key, again.items) == (intent.idempotency_key, intent.items)
    # The same page again: nothing new, nothing claimed twice.
    assert await store.take_in("main", page, NOW, {"GAME-100"}) == []
    assert {c.sku: c for c in await store.stock_counts()}["GAME-100"].free == 1


async def test_take_in_records_orders_whose_keys_do_not_open(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    """A damaged ledger must not stop intake: the orders are recorded, unclaimed, and the
    worker that takes each one up reports the broken key."""
    await stock(sqlite_store, "VIP-30D", 2)
    await sqlite_store.close()
    with sqlite3.connect(tmp_path / "kami.db") as conn:
        # the SKU is bound in as associated data: these keys no longer open as GAME-100's
        conn.execute("UPDATE card_keys SET sku = 'GAME-100'")
    await sqlite_store.open()
    (line,) = await sqlite_store.take_in("main", [order("A")], NOW, {"GAME-100"})
    assert isinstance(line, OrderLine) and line.state == LineState.NEW
    # The claim binds the keys and stops short of a delivery (so the broken key goes to no
    # other line); delivering it is refused with a StoreError, on which the worker parks it.
    claimed = await sqlite_store.claim_for_delivery(line.id, NOW)
    assert isinstance(claimed, OrderLine) and claimed.state == LineState.ALLOCATED
    with pytest.raises(StoreKeyError, match="integrity") as refused:
        await sqlite_store.begin_delivery(line.id, NOW)
    assert isinstance(refused.value, StoreError)


async def test_demand_is_summed_per_sku_and_minute(store: Store) -> None:
    """The forecast reads demand summed per SKU and minute (at the orders' mean time), not
    order by order; parked orders are not demand, orders before `since` are not read."""
    start = 1_700_000_040.0  # a minute's start
    await store.ingest("main", [order("OLD", quantity=9)], start - 600)
    await store.ingest("main", [order("A", quantity=2)], start + 10)
    await store.ingest("main", [order("B", quantity=3)], start + 30)
    await store.ingest("main", [order("V", sku="VIP-30D")], start + 20)
    await store.ingest("main", [order("C")], start + 70)
    await store.ingest("main", [RejectedOrder("X", "unknown SKU", sku="GAME-100")], start + 5)
    demand = sorted(await store.demand_since(start))
    assert demand == [
        ("GAME-100", start + 20, 5),  # A and B: one minute, at their mean time
        ("GAME-100", start + 70, 1),
        ("VIP-30D", start + 20, 1),
    ]


async def test_free_counts(store: Store) -> None:
    await stock(store, "GAME-100", 3)
    await stock(store, "VIP-30D", 1)
    (line_id,) = await store.ingest("main", [order("A", quantity=2)], NOW)
    await store.allocate(line_id, NOW)
    assert await store.free_counts() == {"GAME-100": 1, "VIP-30D": 1}


async def test_card_item_repr_hides_secret() -> None:
    item = CardItem(code="C", secret="very-secret")
    assert "very-secret" not in repr(item)


async def test_integrity_check(store: Store) -> None:
    assert await store.integrity_check() == "ok"
    assert time.time() > 0


async def test_card_keys_are_sealed_on_disk(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    # Neither starts with the SKU, which is stored in clear: the SKU followed by random
    # sealed bytes that happen to read "-1" would look like a code in clear (1 run in ~1,000).
    items = [CardItem(f"card-code-{i:04d}", f"card-secret-{i:04d}") for i in range(50)]
    await sqlite_store.import_keys("GAME-100", items, "test", NOW)
    await sqlite_store.close()
    raw = ledger_bytes(tmp_path)
    assert b"card-code-" not in raw and b"card-secret-" not in raw
    await sqlite_store.open()
    (line_id,) = await sqlite_store.ingest("main", [order("A", quantity=2)], NOW)
    await sqlite_store.allocate(line_id, NOW)
    intent = await sqlite_store.begin_delivery(line_id, NOW)
    assert {i.secret for i in intent.items} == {"card-secret-0000", "card-secret-0001"}


async def test_wrong_master_key_is_refused_clearly(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    await sqlite_store.close()
    other = SQLiteStore(tmp_path / "kami.db", bytes(32))
    with pytest.raises(StoreKeyError, match="does not open this ledger"):
        await other.open()
    await other.close()
    await sqlite_store.open()


async def test_tampered_card_key_fails_integrity(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    await stock(sqlite_store, "GAME-100", 1)
    (line_id,) = await sqlite_store.ingest("main", [order("A")], NOW)
    await sqlite_store.allocate(line_id, NOW)
    await sqlite_store.close()
    with sqlite3.connect(tmp_path / "kami.db") as conn:
        # move the sealed key to another SKU: the SKU is bound in as associated data
        conn.execute("UPDATE card_keys SET sku = 'VIP-30D'")
    await sqlite_store.open()
    with pytest.raises(StoreKeyError, match="integrity"):
        await sqlite_store.bound_items(line_id)


async def test_rotation_reseals_every_key(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    await stock(sqlite_store, "GAME-100", 25)
    (line_id,) = await sqlite_store.ingest("main", [order("A", quantity=3)], NOW)
    await sqlite_store.allocate(line_id, NOW)
    before = await sqlite_store.bound_items(line_id)
    new_id, moved = await sqlite_store.rotate_data_key(NOW, batch=7)
    assert moved == 25
    assert await sqlite_store.bound_items(line_id) == before
    await sqlite_store.close()
    with sqlite3.connect(tmp_path / "kami.db") as conn:
        assert {r[0] for r in conn.execute("SELECT key_id FROM card_keys")} == {new_id}
        live = conn.execute(
            "SELECT COUNT(*) FROM data_keys WHERE purpose = 'data' AND retired_at IS NULL"
        ).fetchone()[0]
        assert live == 1
    await sqlite_store.open()  # reopens with the new data key
    assert len(await sqlite_store.export_keys("GAME-100", KeyState.FREE)) == 22
    again = await sqlite_store.import_keys("GAME-100", keys("GAME-100", 25), "test", NOW)
    assert again.added == 0  # duplicate detection survives rotation

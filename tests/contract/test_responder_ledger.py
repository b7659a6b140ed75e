"""The responder ledger (agent/store/ledger/responder.py) on both databases: reservations bind
all or nothing, a stored reply is replayed byte for byte, a cancel releases or voids, unpaid
reservations run out, an order placed with us is idempotent and owes its callback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest

from agent.domain import LineState
from agent.store.base import LedgerRefused, Store, StoreError
from agent.store.ledger.responder import Cancelled, Handed, Reply, Want
from tests.conftest import master_key_for_tests, stock

NOW = 1_700_000_000.0
P = "eneba"


def ok(success: bool) -> tuple[int, bytes]:
    return 200, json.dumps({"success": success}).encode()


def keys_of(lines: Sequence[Handed]) -> tuple[int, bytes]:
    body = {"keys": [[i.secret for i in h.items] for h in lines], "success": bool(lines)}
    return 200, json.dumps(body).encode()


def said(outcome: Cancelled) -> tuple[int, bytes]:
    return 200, outcome.value.encode()


def r(store: Store) -> Any:  # the responder methods are not on the Store port
    return store


async def counts(store: Store, sku: str) -> tuple[int, int, int]:
    found = {c.sku: c for c in await store.stock_counts()}
    c = found[sku]
    return c.free, c.bound, c.void


async def test_reserve_binds_every_line_or_nothing(store: Store) -> None:
    await stock(store, "GAME-100", 3)
    await stock(store, "VIP-30D", 1)
    refused = await r(store).reserve(P, "o-1", [Want("GAME-100", 2), Want("VIP-30D", 2)], NOW, ok)
    assert json.loads(refused.body) == {"success": False}
    assert await counts(store, "GAME-100") == (3, 0, 0)
    assert await store.find_lines("o-1") == []
    # The refusal is kept: the platform was told, it stays told.
    again = await r(store).reserve(P, "o-1", [Want("GAME-100", 1)], NOW, ok)
    assert again.replayed and again.body == refused.body
    reply = await r(store).reserve(P, "o-2", [Want("GAME-100", 2), Want("VIP-30D", 1)], NOW, ok)
    assert json.loads(reply.body) == {"success": True} and not reply.replayed
    lines = await store.find_lines("o-2")
    assert [line.state for line in lines] == [LineState.RESERVED] * 2
    assert await counts(store, "GAME-100") == (1, 2, 0)


async def test_provide_answers_the_bound_keys_and_every_retry_gets_the_same_bytes(
    store: Store,
) -> None:
    await stock(store, "GAME-100", 4)
    await r(store).reserve(P, "o-1", [Want("GAME-100", 2)], NOW, ok)
    first = await r(store).provide(P, "o-1", NOW + 1, keys_of)
    bound = {
        i.secret for line in await store.find_lines("o-1") for i in await store.bound_items(line.id)
    }
    assert set(json.loads(first.body)["keys"][0]) == bound and len(bound) == 2
    retries = await asyncio.gather(
        *(r(store).provide(P, "o-1", NOW + 2, keys_of) for _ in range(5))
    )
    assert all(x.body == first.body and x.replayed for x in retries)
    stored = await r(store).stored_reply(P, "o-1", "PROVIDE")
    assert stored.body == first.body
    [line] = await store.find_lines("o-1")
    assert line.state == LineState.PROVIDED
    unknown = await r(store).provide(P, "nope", NOW, keys_of)
    assert json.loads(unknown.body) == {"keys": [], "success": False}


async def test_cancel_before_provide_releases_and_after_provide_voids(store: Store) -> None:
    await stock(store, "GAME-100", 4)
    await r(store).reserve(P, "early", [Want("GAME-100", 2)], NOW, ok)
    await r(store).reserve(P, "late", [Want("GAME-100", 2)], NOW, ok)
    assert await counts(store, "GAME-100") == (0, 4, 0)
    released = await r(store).cancel_order(P, "early", "buyer did not pay", NOW, said)
    assert released.body == b"released"
    assert await counts(store, "GAME-100") == (2, 2, 0)
    # A PROVIDE after the cancel hands out nothing.
    assert json.loads((await r(store).provide(P, "early", NOW, keys_of)).body)["success"] is False
    await r(store).provide(P, "late", NOW, keys_of)
    voided = await r(store).cancel_order(P, "late", "order failed", NOW, said)
    assert voided.body == b"voided"
    assert await counts(store, "GAME-100") == (2, 0, 2)
    [line] = await store.find_lines("late")
    assert line.state == LineState.CANCELLED
    assert (await r(store).cancel_order(P, "late", "again", NOW, said)).body == b"voided"
    assert (await r(store).cancel_order(P, "never", "x", NOW, said)).body == b"unknown"


async def test_unpaid_reservations_run_out_and_their_keys_return(store: Store) -> None:
    await stock(store, "GAME-100", 3)
    await r(store).reserve(P, "old", [Want("GAME-100", 2)], NOW, ok)
    await r(store).reserve(P, "new", [Want("GAME-100", 1)], NOW + 100, ok)
    assert await r(store).release_expired(P, NOW + 50, NOW + 200) == 1
    assert await counts(store, "GAME-100") == (2, 1, 0)
    [line] = await store.find_lines("old")
    assert line.state == LineState.CANCELLED


async def test_a_provided_key_never_goes_back_to_stock(store: Store) -> None:
    await stock(store, "GAME-100", 1)
    await r(store).reserve(P, "o", [Want("GAME-100", 1)], NOW, ok)
    await r(store).provide(P, "o", NOW, keys_of)
    [line] = await store.find_lines("o")

    async def unbind(tx: Any) -> None:
        await tx.execute(
            "UPDATE card_keys SET state = 'free', order_line_id = NULL, slot = NULL"
            " WHERE order_line_id = $1",
            line.id,
        )

    with pytest.raises(LedgerRefused):
        await r(store)._write(unbind)


async def test_an_order_placed_with_us_is_idempotent_and_owes_its_callback(store: Store) -> None:
    await stock(store, "GAME-100", 3)

    def render(handed: Handed | None) -> tuple[int, bytes]:
        if handed is None:
            return 409, b"short"
        return 200, json.dumps({"order_id": handed.line.id}).encode()

    def callback(handed: Handed) -> bytes:
        return json.dumps([i.secret for i in handed.items]).encode()

    place = r(store).place_order
    first = await place(P, "A-1", Want("GAME-100", 2), NOW, render, ("http://x/cb", callback))
    same = await asyncio.gather(
        *(
            place(P, "A-1", Want("GAME-100", 2), NOW, render, ("http://x/cb", callback))
            for _ in range(4)
        )
    )
    assert all(s.body == first.body for s in same)
    assert (await place(P, "A-2", Want("GAME-100", 2), NOW, render, None)).status == 409
    assert await store.find_lines("A-2") == []
    [line] = await store.find_lines("A-1")
    assert line.state == LineState.PROVIDED
    [item] = await r(store).due_callbacks(P, NOW, 10)
    handed = await r(store).handed_line(P, line.id)
    assert json.loads(item.body) == [i.secret for i in handed.items]
    await r(store).callback_done(item, NOW, error="HTTP 500", retry_at=NOW + 5)
    assert await r(store).due_callbacks(P, NOW + 1, 10) == []
    [item] = await r(store).due_callbacks(P, NOW + 5, 10)
    await r(store).callback_done(item, NOW + 5)
    assert await r(store).due_callbacks(P, NOW + 99, 10) == []
    [line] = await store.find_lines("A-1")
    assert line.state == LineState.DELIVERED
    assert await r(store).handed_line("other", line.id) is None


async def test_a_reply_survives_a_restart_and_is_replayed_from_the_ledger(tmp_path: Any) -> None:
    from agent.store.identity import Opening
    from agent.store.sqlite import SQLiteStore
    from tests.conftest import master_key_for_tests

    first = SQLiteStore(tmp_path / "k.db", master_key_for_tests(), opening=Opening.CREATE)
    await first.open()
    await stock(first, "GAME-100", 3)
    await first.reserve(P, "o", [Want("GAME-100", 2)], NOW, ok)
    before = await first.provide(P, "o", NOW, keys_of)
    cached = first.cached_reply(P, "o", "PROVIDE")
    assert cached is not None and cached.body == before.body and cached.replayed
    await first.close()
    again = SQLiteStore(tmp_path / "k.db", master_key_for_tests())
    await again.open()
    try:
        assert again.cached_reply(P, "o", "PROVIDE") is None  # a new process: nothing in memory
        after = await again.provide(P, "o", NOW + 9, keys_of)
        assert after.replayed and after.body == before.body
        assert again.cached_reply(P, "o", "PROVIDE") is not None
    finally:
        await again.close()


def counting_writes(store: Store) -> list[int]:
    """Counts the write transactions the engine is asked for (each its own transaction on
    PostgreSQL, its own savepoint inside a group commit on SQLite), still run by it."""
    count = [0]
    real = r(store)._write

    async def counted(body: Any) -> Any:
        count[0] += 1
        return await real(body)

    r(store)._write = counted
    return count


async def test_concurrent_first_provides_share_one_ledger_body(store: Store) -> None:
    await stock(store, "GAME-100", 60)
    orders = [f"o-{n}" for n in range(20)]
    for n, order in enumerate(orders):
        await r(store).reserve(P, order, [Want("GAME-100", 1 + n % 3)], NOW, ok)
    writes = counting_writes(store)
    # A sale's PROVIDEs arriving together, one of them twice.
    replies = await asyncio.gather(
        *(r(store).provide(P, order, NOW + 1, keys_of) for order in [*orders, "o-7"])
    )
    assert writes[0] < len(orders) // 2  # one body for the batch, not one per order
    handed = [json.loads(reply.body)["keys"] for reply in replies]
    every = [key for keys in handed[: len(orders)] for line in keys for key in line]
    assert len(every) == len(set(every)) == sum(1 + n % 3 for n in range(len(orders)))
    for order, keys in zip(orders, handed, strict=False):
        [line] = await store.find_lines(order)
        assert line.state == LineState.PROVIDED
        assert keys == [[i.secret for i in await store.bound_items(line.id)]]
    # The duplicate got the very bytes stored for the first, as a replay.
    assert replies[-1].body == replies[7].body
    assert sorted(x.replayed for x in (replies[7], replies[-1])) == [False, True]
    assert not any(x.replayed for x in replies[: len(orders)])
    for order, reply in zip(orders, replies, strict=False):
        assert (await r(store).stored_reply(P, order, "PROVIDE")).body == reply.body


async def test_a_broken_order_in_a_batch_of_provides_fails_alone(store: Store) -> None:
    await stock(store, "GAME-100", 12)
    orders = [f"o-{n}" for n in range(6)]
    for order in orders:
        await r(store).reserve(P, order, [Want("GAME-100", 2)], NOW, ok)
    [broken] = await store.find_lines("o-3")

    async def short(tx: Any) -> None:  # the line says 3 keys, holds 2: the ledger refuses
        await tx.execute("UPDATE orders SET quantity = 3 WHERE id = $1", broken.id)

    await r(store)._write(short)
    replies = await asyncio.gather(
        *(r(store).provide(P, order, NOW + 1, keys_of) for order in orders),
        return_exceptions=True,
    )
    assert isinstance(replies[3], StoreError)
    for order, reply in zip(orders, replies, strict=True):
        if order == "o-3":
            continue
        assert isinstance(reply, Reply) and not reply.replayed
        assert len(json.loads(reply.body)["keys"][0]) == 2
        [line] = await store.find_lines(order)
        assert line.state == LineState.PROVIDED
    [line] = await store.find_lines("o-3")
    assert line.state == LineState.RESERVED  # nothing of it was kept
    assert await r(store).stored_reply(P, "o-3", "PROVIDE") is None


async def test_a_provide_racing_another_agents_reply_answers_that_reply(
    pg_url: str,
) -> None:
    # Two agents on one PostgreSQL ledger answer a PROVIDE of an order neither holds (it
    # locks no line). Agent b writes its reply first and commits it only once agent a's own
    # write waits on that row: a stores nothing, and answers b's reply. a's batch failed
    # first (a broken order beside it), so the race hits a call run on its own.
    asyncpg = pytest.importorskip("asyncpg")
    from agent.store.postgres import PostgresStore

    a, b = (PostgresStore(pg_url, master_key_for_tests(), instance=name) for name in "ab")
    await asyncio.gather(a.open(), b.open())
    try:
        await stock(a, "GAME-100", 2)
        await r(a).reserve(P, "broken", [Want("GAME-100", 2)], NOW, ok)
        [broken] = await a.find_lines("broken")

        async def short(tx: Any) -> None:  # the line says 3 keys, holds 2: the ledger refuses
            await tx.execute("UPDATE orders SET quantity = 3 WHERE id = $1", broken.id)

        await r(a)._write(short)
        written, commit = asyncio.Event(), asyncio.Event()

        async def b_replies(tx: Any) -> Reply:
            reply = await r(b)._keep(tx, P, "unknown", "PROVIDE", (200, b"b's reply"), NOW)
            written.set()
            await commit.wait()
            assert isinstance(reply, Reply)
            return reply

        b_done = asyncio.create_task(r(b)._write(b_replies))
        await written.wait()
        answers = asyncio.gather(
            *(r(a).provide(P, order, NOW + 1, keys_of) for order in ("broken", "unknown")),
            return_exceptions=True,
        )
        watch = await asyncpg.connect(pg_url)
        try:
            for _ in range(3000):  # until a's write waits on b's row
                if await watch.fetchval(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                ):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("agent a never wrote its reply")
        finally:
            await watch.close()
        commit.set()
        replies = await answers
        assert isinstance(replies[0], StoreError)
        assert isinstance(replies[1], Reply)
        assert (replies[1].body, replies[1].replayed) == (b"b's reply", True)
        assert (await b_done).body == b"b's reply"
    finally:
        await a.close()
        await b.close()

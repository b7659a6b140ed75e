"""What only the shared PostgreSQL store has to get right: several agents on one database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.domain import DeliveryIntent, KeyState, LineState, PlatformOrder
from agent.store import postgres
from agent.store.postgres import PostgresStore, lock_id
from agent.store.rows import migrations
from tests.conftest import keys, master_key_for_tests, stock

asyncpg = pytest.importorskip("asyncpg")

NOW = 1_700_000_000.0
LEASE = 30.0


def order(order_id: str, sku: str = "GAME-100", quantity: int = 1) -> PlatformOrder:
    return PlatformOrder(order_id=order_id, status="paid", sku=sku, quantity=quantity)


@pytest.fixture
async def agents(pg_url: str) -> AsyncIterator[list[PostgresStore]]:
    """Three agents' stores on one database, opened at the same moment (one migrates)."""
    stores = [
        PostgresStore(pg_url, master_key_for_tests(), instance=name, lease_seconds=LEASE)
        for name in ("a", "b", "c")
    ]
    await asyncio.gather(*(s.open() for s in stores))
    yield stores
    for s in stores:
        await s.close()


async def test_agents_starting_together_migrate_once(
    agents: list[PostgresStore], pg_url: str
) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        versions = len(migrations("postgres"))
        assert await conn.fetchval("SELECT COUNT(*) FROM schema_version") == versions
        assert await conn.fetchval("SELECT COUNT(*) FROM data_keys WHERE purpose = 'hash'") == 1
    finally:
        await conn.close()


async def test_schema_refuses_to_unbind_or_delete_keys(
    agents: list[PostgresStore], pg_url: str
) -> None:
    a = agents[0]
    await stock(a, "GAME-100", 2)
    (line_id,) = await a.ingest("main", [order("A")], NOW)
    await a.allocate(line_id, NOW)
    conn = await asyncpg.connect(pg_url)
    try:
        with pytest.raises(asyncpg.RaiseError, match="bound card key"):
            await conn.execute("UPDATE card_keys SET state = 'free', order_line_id = NULL")
        with pytest.raises(asyncpg.RaiseError, match="never deleted"):
            await conn.execute("DELETE FROM card_keys")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "UPDATE card_keys SET state = 'bound', order_line_id = $1, slot = 0"
                " WHERE state = 'free'",
                line_id,
            )
        sealed = await conn.fetchval(
            "SELECT string_agg(encode(sealed, 'escape'), '') FROM card_keys"
        )
        assert "S-GAME-100" not in sealed
    finally:
        await conn.close()


async def test_concurrent_claims_never_share_a_key(agents: list[PostgresStore]) -> None:
    """Three agents race to claim 90 lines against 60 keys: 60 lines get distinct keys, 30
    wait, no key is bound twice."""
    await stock(agents[0], "GAME-100", 60)
    line_ids = await agents[0].ingest("main", [order(f"O{i:03}") for i in range(90)], NOW)
    # every agent tries every line, in its own order
    later = NOW + LEASE + 1  # past agent a's intake lease, so b and c may work too

    async def run(store: PostgresStore, ids: list[int]) -> list[DeliveryIntent]:
        intents = []
        for line_id in ids:
            claimed = await store.claim_for_delivery(line_id, later)
            if isinstance(claimed, DeliveryIntent):
                intents.append(claimed)
        return intents

    results = await asyncio.gather(
        run(agents[0], line_ids),
        run(agents[1], line_ids[::-1]),
        run(agents[2], line_ids[45:] + line_ids[:45]),
    )
    intents = [i for r in results for i in r]
    keys_handed = [key for i in intents for key in i.key_ids]
    assert len(keys_handed) == len(set(keys_handed)) == 60
    (count,) = await agents[1].stock_counts()
    assert (count.free, count.bound) == (0, 60)
    states = await agents[2].count_by_state()
    assert states[LineState.DELIVERING] == 60 and states[LineState.BACKORDERED] == 30
    assert await agents[0].integrity_check() == "ok"


async def test_concurrent_intake_makes_one_line_per_order(agents: list[PostgresStore]) -> None:
    pages = [[order(f"P{i:03}") for i in range(200)] for _ in agents]
    pages[1].reverse()  # another order of the same orders must not deadlock
    taken = await asyncio.gather(
        *(s.ingest("main", p, NOW) for s, p in zip(agents, pages, strict=True))
    )
    ids = [i for t in taken for i in t]
    assert len(ids) == len(set(ids)) == 200
    assert (await agents[0].count_by_state())[LineState.NEW] == 200


async def test_concurrent_take_in_claims_each_order_once(agents: list[PostgresStore]) -> None:
    """Agents taking in the same flash sale at once, pages cut differently: each order is
    recorded and claimed by one of them, no key goes to two lines, and the orders the
    stock cannot fill are backordered."""
    await stock(agents[0], "GAME-100", 150)
    orders = [order(f"F{i:03}") for i in range(200)]
    pages = [orders[:120], orders[60:], orders[::-1]]
    taken = await asyncio.gather(
        *(s.take_in("main", p, NOW, {"GAME-100"}) for s, p in zip(agents, pages, strict=True))
    )
    lines = [t for page in taken for t in page]
    intents = [t for t in lines if isinstance(t, DeliveryIntent)]
    order_ids = [t.line.order_id if isinstance(t, DeliveryIntent) else t.order_id for t in lines]
    # each order came back new to exactly one agent
    assert sorted(order_ids) == sorted(o.order_id for o in orders)
    assert len(intents) == 150
    key_ids = [k for t in intents for k in t.key_ids]
    assert len(key_ids) == len(set(key_ids)) == 150
    states = await agents[0].count_by_state()
    assert states[LineState.DELIVERING] == 150 and states[LineState.BACKORDERED] == 50
    assert await agents[0].integrity_check() == "ok"


async def test_take_in_records_orders_whose_keys_do_not_open(
    agents: list[PostgresStore], pg_url: str
) -> None:
    a = agents[0]
    await stock(a, "VIP-30D", 2)
    conn = await asyncpg.connect(pg_url)
    try:
        # the SKU is bound in as associated data: these keys no longer open as GAME-100's
        await conn.execute("UPDATE card_keys SET sku = 'GAME-100'")
    finally:
        await conn.close()
    (line,) = await a.take_in("main", [order("A")], NOW, {"GAME-100"})
    assert not isinstance(line, DeliveryIntent) and line.state == LineState.NEW
    assert (await a.count_by_state())[LineState.NEW] == 1


async def test_leases_keep_other_agents_off_a_line_until_they_expire(
    agents: list[PostgresStore],
) -> None:
    a, b, _ = agents
    (line_id,) = await a.ingest("main", [order("A")], NOW)
    assert await b.take_line(line_id, NOW + 1) is None
    assert await b.due_lines(NOW + 1, 10) == []
    assert (await a.take_line(line_id, NOW + 1)) is not None  # its own lease: renewed
    # agent a is killed: its lease runs out and b takes the line over
    taken = await b.due_lines(NOW + 1 + LEASE + 1, 10)
    assert [line.id for line in taken] == [line_id]
    assert await a.take_line(line_id, NOW + 2 + LEASE) is None  # now b holds it


async def test_finishing_a_step_lets_go_of_the_lease(agents: list[PostgresStore]) -> None:
    a, b, _ = agents
    (line_id,) = await a.ingest("main", [order("A")], NOW)
    await a.defer(line_id, NOW + 5, "platform busy", ambiguous=False, now=NOW)
    assert await b.due_lines(NOW + 1, 10) == []  # not due yet
    assert [line.id for line in await b.due_lines(NOW + 6, 10)] == [line_id]


async def test_sweeps_split_due_work_between_agents(agents: list[PostgresStore]) -> None:
    a, b, c = agents
    ids = await a.ingest("main", [order(f"S{i:02}") for i in range(30)], NOW)
    later = NOW + LEASE + 1
    first = await b.due_lines(later, 10)
    second = await c.due_lines(later, 100)
    assert {line.id for line in first}.isdisjoint(line.id for line in second)
    assert {line.id for line in first} | {line.id for line in second} == set(ids)


async def test_singleton_jobs_run_on_one_agent_at_a_time(
    agents: list[PostgresStore], pg_url: str
) -> None:
    a, b, _ = agents
    async with a.singleton("forecast") as mine:
        assert mine
        async with b.singleton("forecast") as theirs:
            assert not theirs
        async with b.singleton("outbox") as other_job:
            assert other_job
    async with b.singleton("forecast") as after:
        assert after
    # a killed agent's lock goes with its connection (a process that dies closes it)
    dying = await asyncpg.connect(pg_url)
    assert await dying.fetchval("SELECT pg_try_advisory_lock($1)", lock_id("sweep"))
    async with b.singleton("sweep") as blocked:
        assert not blocked
    dying.terminate()
    for _ in range(100):  # the server notices the dropped connection at once, or nearly
        async with b.singleton("sweep") as taken_over:
            if taken_over:
                break
        await asyncio.sleep(0.05)
    assert taken_over


async def test_a_job_whose_lock_connection_dies_stops_before_another_agent_runs_it(
    agents: list[PostgresStore], pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ends the session holding a leader's lock (a restart, a timeout): another
    agent can take the job at once, so the first must stop running it, not lead on."""
    monkeypatch.setattr(postgres, "LOCK_CHECK_SECONDS", 0.1)
    a, b, _ = agents
    leading = asyncio.Event()

    async def leader() -> str:
        async with a.singleton("stocksync") as ours:
            assert ours
            leading.set()
            await asyncio.sleep(3600)  # a leader's loop: runs until it is told otherwise
        return "stepped down"

    task = asyncio.create_task(leader())
    await leading.wait()
    admin = await asyncpg.connect(pg_url)
    try:
        ended = await admin.fetchval(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted"
        )
    finally:
        await admin.close()
    assert ended == 1
    assert await asyncio.wait_for(task, 30) == "stepped down"
    async with b.singleton("stocksync") as theirs:
        assert theirs
    assert await a.stock_counts() == []  # the first agent's store goes on working


async def test_rotation_on_one_agent_is_seen_by_the_others(
    agents: list[PostgresStore], tmp_path: Path
) -> None:
    a, b, _ = agents
    await stock(a, "GAME-100", 10)
    (line_id,) = await b.ingest("main", [order("A", quantity=2)], NOW)
    await b.allocate(line_id, NOW)
    before = await b.bound_items(line_id)
    new_id, moved = await a.rotate_data_key(NOW, batch=3)
    assert moved == 10
    assert await b.bound_items(line_id) == before  # b loads the new data key on demand
    report = await b.import_keys("GAME-100", keys("GAME-100", 15), "test", NOW)
    assert report.added == 5  # duplicate detection spans agents and rotations
    assert len(await a.export_keys("GAME-100", KeyState.FREE)) == 13
    assert new_id > 0

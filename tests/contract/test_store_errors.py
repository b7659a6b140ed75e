"""Driver errors end as errors of the AgentError tree at the store's boundary, never raw:
Transient for a lock wait that timed out or a lost connection, StoreError when the ledger
refuses a write or a value."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.domain import AgentError, PlatformOrder, Transient
from agent.store.base import LedgerBusy, LedgerDataError, LedgerUnavailable, Store, StoreError
from agent.store.sqlite import SQLiteStore
from tests.helpers import wait_for

NOW = 1_700_000_000.0


async def test_a_second_open_purchase_is_a_store_error(store: Store) -> None:
    (line_id,) = await store.ingest("main", [PlatformOrder("A", "paid", "GAME-100", 1)], NOW)
    await store.begin_purchase(line_id, "fulu", NOW)
    with pytest.raises(StoreError, match="already has a purchase open"):
        await store.begin_purchase(line_id, "other", NOW)


async def test_a_value_the_ledger_cannot_store_is_a_store_error(store: Store) -> None:
    (line_id,) = await store.ingest("main", [PlatformOrder("A", "paid", "GAME-100", 1)], NOW)
    with pytest.raises(LedgerDataError) as refused:
        await store.park(line_id, "a lone surrogate \ud800 and a NUL \x00", NOW)
    assert isinstance(refused.value, StoreError)
    assert (await store.get_line(line_id)).reason is None  # type: ignore[union-attr]


async def test_a_lock_wait_that_times_out_is_transient(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "kami.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        sqlite_store._conn.execute("PRAGMA busy_timeout=50")  # type: ignore[union-attr]
        with pytest.raises(LedgerBusy, match="locked") as busy:
            await sqlite_store.set_cursor("main", "c1", NOW)
        assert isinstance(busy.value, Transient)
        other.execute("ROLLBACK")
        await sqlite_store.set_cursor("main", "c1", NOW)  # and it goes on once let go
    finally:
        other.close()


async def test_a_lost_connection_is_transient(pg_url: str, tmp_path: Path) -> None:
    import asyncio

    import asyncpg

    from tests.conftest import open_test_store

    store = open_test_store("postgres", tmp_path, pg_url, instance="a", pool_size=1)
    await store.open()
    admin = await asyncpg.connect(pg_url)
    try:
        await store.set_cursor("main", "c0", NOW)
        async with admin.transaction():
            await admin.execute("SELECT * FROM cursors WHERE platform = 'main' FOR UPDATE")
            writing = asyncio.ensure_future(store.set_cursor("main", "c1", NOW))
            await wait_for(  # the store's write waits for the row now
                lambda: admin.fetchval("SELECT COUNT(*) > 0 FROM pg_locks WHERE NOT granted"),
                "the write to wait for the row",
            )
            await admin.execute(  # its connection is lost in the middle of the transaction
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            with pytest.raises(LedgerUnavailable) as lost:
                await writing
        assert isinstance(lost.value, Transient) and isinstance(lost.value, AgentError)
        await store.set_cursor("main", "c1", NOW)  # the pool connects again
        assert await store.get_cursor("main") == "c1"
    finally:
        await admin.close()
        await store.close()

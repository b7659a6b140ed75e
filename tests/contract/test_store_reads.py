"""Reads never take the ledger's write lock: `stock list` over a big ledger beside a running
daemon used to hold the lock for the whole read (BEGIN IMMEDIATE), and the daemon's
deliveries waited for it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.store.base import LedgerError, Store
from agent.store.identity import Opening
from agent.store.sqlite import SQLiteStore
from tests.conftest import master_key_for_tests

BIG = 300_000


def _fill(db: Path, count: int) -> None:
    """`count` free keys of one SKU, written straight into the file (sealing each would take
    a minute; counting them needs no key to open)."""
    with sqlite3.connect(db) as conn:
        key_id = conn.execute("SELECT MAX(id) FROM data_keys WHERE purpose = 'data'").fetchone()[0]
        conn.executemany(
            "INSERT INTO card_keys (sku, key_id, sealed, secret_hash, state, source, added_at)"
            " VALUES ('BULK', ?, x'00', ?, 'free', 'test', 0)",
            ((key_id, n.to_bytes(8, "big")) for n in range(count)),
        )


class HeldRead:
    """Holds the first statement a store runs after `arm()` inside SQLite (its progress
    handler) until `release()`: a read caught in the middle, on whatever thread runs it."""

    def __init__(self, store: SQLiteStore) -> None:
        self.inside = threading.Event()
        self._go = threading.Event()
        self._armed = False
        for name in ("_conn", "_rconn"):  # every connection the store has
            conn = getattr(store, name, None)
            if conn is not None:
                conn.set_progress_handler(self._hold, 1000)

    def arm(self) -> None:
        self._armed = True

    def _hold(self) -> int:
        if self._armed:
            self._armed = False
            self.inside.set()
            self._go.wait(timeout=5.0)  # the read stays open until the test lets it go
        return 0

    def release(self) -> None:
        self._go.set()


async def test_a_long_read_holds_up_no_writer(tmp_path: Path) -> None:
    db = tmp_path / "kami.db"
    daemon = SQLiteStore(db, master_key_for_tests(), opening=Opening.CREATE)
    await daemon.open()
    await daemon.close()
    _fill(db, BIG)
    await daemon.open()
    cli = SQLiteStore(db, master_key_for_tests())  # `kami-agent stock list` beside it
    await cli.open()
    held = HeldRead(cli)
    try:
        held.arm()
        listing = asyncio.ensure_future(cli.stock_counts())
        assert await asyncio.to_thread(held.inside.wait, 30)
        # The read is open now, in the middle of its statement: writers go on meanwhile,
        # the daemon's (another connection) and the same store's own.
        await asyncio.wait_for(daemon.set_cursor("main", "c1", 1.0), timeout=30)
        await asyncio.wait_for(cli.set_cursor("other", "c2", 1.0), timeout=30)
        assert not listing.done(), "the writes waited for the read to end"
        held.release()
        (count,) = await listing
        assert (count.sku, count.free) == ("BULK", BIG)
    finally:
        held.release()
        await cli.close()
        await daemon.close()
    assert await _cursor(db, "main") == "c1"


async def _cursor(db: Path, platform: str) -> Any:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT cursor FROM cursors WHERE platform = ?", (platform,)
        ).fetchone()[0]


async def test_a_read_transaction_cannot_write(store: Store) -> None:
    """Reads run read-only: a read body that tried to write would be refused, not take a
    write lock (SQLite: query_only; PostgreSQL: a READ ONLY transaction)."""
    with pytest.raises(LedgerError):
        await store._read(  # type: ignore[attr-defined]
            lambda tx: tx.execute("UPDATE cursors SET cursor = 'x'")
        )

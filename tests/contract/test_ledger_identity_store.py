"""A sealed card key is bound to its row; a ledger made before ids and row binding is adopted
once (issue 13, items 3 and 9). On both ledgers where the ledger is not a file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.domain import KeyState, LineState
from agent.keybox import SealedKeyError
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import LedgerError, Store
from agent.store.bound_journal import journal_path
from agent.store.identity import Opening, identity_path
from agent.store.rows import migrations
from agent.store.sqlite import SQLiteStore
from tests.conftest import keys, make_config, master_key_for_tests, stock
from tests.helpers import (
    assert_platform_invariants,
    delivered_all,
    line_state_is,
    running_agent,
    wait_for,
)

# Row 2 gets row 1's sealed value (and its data key): the copy a tampered ledger would hold.
MOVE_SEALED = (
    "UPDATE card_keys SET sealed = src.sealed, key_id = src.key_id"
    " FROM (SELECT sealed, key_id FROM card_keys ORDER BY id LIMIT 1) AS src"
    " WHERE card_keys.id = (SELECT MAX(id) FROM card_keys)"
)


async def raw_sql(store: Store, sql: str) -> None:
    """One statement on the store's own connection, as someone with the file would run it."""
    if isinstance(store, SQLiteStore):
        await store._write(lambda conn: conn.execute(sql))
        return

    async def run(conn: Any) -> None:
        await conn.execute(sql)

    await store._write(run)  # type: ignore[attr-defined]


async def test_a_sealed_key_moved_to_another_row_is_parked_not_delivered(
    store: Store, sandbox: SandboxPlatform, tmp_path: Path
) -> None:
    await stock(store, "GAME-100", 2)
    await raw_sql(store, MOVE_SEALED)
    with pytest.raises(SealedKeyError, match="moved there from another row"):
        await store.export_keys("GAME-100", KeyState.FREE)

    first = sandbox.add_order("GAME-100")  # takes row 1, whose key is its own
    async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
        await wait_for(delivered_all(sandbox, [first]), "the first delivery")
        second = sandbox.add_order("GAME-100")  # row 2 holds row 1's key: never sent
        await wait_for(line_state_is(store, second, LineState.NEEDS_ATTENTION), "it parked")
    assert sandbox.orders[second].delivery is None
    assert [c for c in sandbox.delivery_calls if c.order_id == second] == []
    (line,) = await store.find_lines(second)
    assert "integrity check" in (line.reason or "")
    assert_platform_invariants(sandbox)


def _as_made_before_ids(db: Path, store: SQLiteStore) -> None:
    """Replaces a ledger by one made before ids existed: the schema of migrations 0001-0004
    only (built from those very files, so later migrations run on it as on a shop's real
    ledger), no id, no identity file, every card key sealed with its SKU alone."""
    with sqlite3.connect(db) as conn:
        data_keys = conn.execute(
            "SELECT id, purpose, wrapped, created_at FROM data_keys"
        ).fetchall()
        rows = conn.execute(
            "SELECT id, sku, key_id, sealed, secret_hash, source, added_at FROM card_keys"
        ).fetchall()
    old_rows = []
    for row_id, sku, key_id, sealed, secret_hash, source, added_at in rows:
        item = store.keybox.open(sku, key_id, sealed, secret_hash)
        _, old = store.keybox._seal(sku.encode(), item, key_id)
        old_rows.append((row_id, sku, old, key_id, secret_hash, source, added_at))
    old_db = db.with_name("old.db")
    with sqlite3.connect(old_db) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, sql in migrations("sqlite"):
            if version <= 4:
                conn.executescript(sql)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        conn.executemany(
            "INSERT INTO data_keys (id, purpose, wrapped, created_at) VALUES (?, ?, ?, ?)",
            data_keys,
        )
        conn.executemany(
            "INSERT INTO card_keys (id, sku, sealed, key_id, secret_hash, state, source,"
            " added_at) VALUES (?, ?, ?, ?, ?, 'free', ?, ?)",
            old_rows,
        )
    for leftover in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        leftover.unlink(missing_ok=True)
    old_db.rename(db)
    identity_path(db).unlink()
    journal_path(db).unlink()  # nor had it a bound-keys journal


async def test_a_ledger_made_before_ids_is_adopted_and_resealed_once(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    db = tmp_path / "kami.db"
    await stock(sqlite_store, "GAME-100", 30)
    expected = await sqlite_store.export_keys("GAME-100", KeyState.FREE)
    await sqlite_store.close()
    _as_made_before_ids(db, sqlite_store)

    again = SQLiteStore(db, master_key_for_tests())
    await again.open()  # adopted: an id given, the identity file written, keys re-sealed
    try:
        assert await again.export_keys("GAME-100", KeyState.FREE) == expected
        recorded = json.loads(identity_path(db).read_text(encoding="utf-8"))["ledger_id"]
        assert again.ledger_id is not None and recorded == again.ledger_id
    finally:
        await again.close()
    with sqlite3.connect(db) as conn:
        left = conn.execute(
            "SELECT COUNT(*) FROM card_keys WHERE sku_bound_seal IS NOT NULL"
        ).fetchone()
    assert left == (0,)
    # Opened again, it is simply this shop's ledger.
    third = SQLiteStore(db, master_key_for_tests())
    await third.open()
    assert third.ledger_id == recorded
    assert (await third.import_keys("GAME-100", keys("GAME-100", 30), "t", 1.0)).added == 0
    await third.close()


async def test_postgres_init_makes_the_ledger_once(pg_url: str) -> None:
    from agent.store.postgres import PostgresStore

    made = PostgresStore(pg_url, master_key_for_tests(), opening=Opening.CREATE)
    await made.open()
    await made.close()
    assert made.ledger_id is not None
    again = PostgresStore(pg_url, master_key_for_tests(), opening=Opening.CREATE)
    with pytest.raises(LedgerError, match="already holds tables"):
        await again.open()
    agent = PostgresStore(pg_url, master_key_for_tests(), instance="a")
    await agent.open()
    assert agent.ledger_id == made.ledger_id
    await agent.close()

"""migrate-store: moves a shop's SQLite ledger into PostgreSQL without losing a key.

Every row is copied as it is — ids, states, bindings, the audit trail, and the card keys still
sealed (their data keys stay wrapped by the same master key) — in one PostgreSQL transaction,
so the target holds the whole ledger or nothing. The source is checked to be idle (no daemon
on it) and is left untouched as a backup. Afterwards both sides are compared row by row.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from agent.store.base import StoreError
from agent.store.postgres import PostgresStore, migrate_schema, safe_url
from agent.store.sqlite import SQLiteStore, exclusive_ledger

Conn = Any  # asyncpg ships no type information

# Parents before children, so every foreign key finds its row. ledger_meta carries the
# ledger's id: the PostgreSQL ledger goes on as the same ledger.
TABLES = (
    "ledger_meta",
    "data_keys",
    "orders",
    "pools",  # consignment: platform pools, and the adds that consigned keys to them
    "pool_adds",
    "card_keys",
    "events",
    "cursors",
    "purchases",
    "alerts",
    "outbox",
    "alert_history",
    "replies",  # a responder platform's stored replies (agent/listener.py)
    "callbacks",
)
BATCH = 20_000
# What proves a card key arrived intact and in the same hands.
KEY_FINGERPRINT_COLUMNS = "id, sku, key_id, sealed, secret_hash, state, order_line_id, slot"


@dataclass(frozen=True, slots=True)
class MigrationReport:
    rows: dict[str, int]
    card_keys_digest: str


def parse_sqlite_source(spec: str) -> Path:
    """`sqlite:/path/kami.db` (or sqlite:///path) -> the path."""
    if not spec.startswith("sqlite:"):
        raise StoreError(f"--from must be sqlite:/path/to/kami.db, got {spec!r}")
    raw = spec.removeprefix("sqlite:")
    if raw.startswith("//"):
        raw = raw[2:]
    path = Path(raw).expanduser()
    if not path.is_file():
        raise StoreError(f"no SQLite ledger at {path}")
    return path


def check_postgres_target(spec: str) -> str:
    if not spec.startswith(("postgresql://", "postgres://")):
        raise StoreError(
            f"--to must be a postgresql://user@host/database URL, got {safe_url(spec)!r}"
        )
    return spec


async def migrate_sqlite_to_postgres(
    source: Path,
    target_url: str,
    master_key: bytes,
    *,
    password: str | None = None,
    say: Callable[[str], None] = print,
) -> MigrationReport:
    try:
        conn = await asyncpg.connect(target_url, password=password)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot connect to {safe_url(target_url)}: {exc}") from exc
    try:
        with exclusive_ledger(source):  # no daemon may write while we copy
            # Opening brings an older ledger's schema up to date and proves the master key
            # opens it, before anything is copied.
            sqlite_store = SQLiteStore(source, master_key)
            await sqlite_store.open()
            await sqlite_store.close()
            src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
            try:
                await migrate_schema(conn)
                rows = await _copy_all(src, conn, say)
                expected = _sqlite_digest(src)
            finally:
                src.close()
    finally:
        await conn.close()
    # Verify through the store itself: the keys unwrap, and the rows are the same rows.
    target = PostgresStore(target_url, master_key, instance="migrate-store", password=password)
    await target.open()
    await target.close()
    conn = await asyncpg.connect(target_url, password=password)
    try:
        async with conn.transaction(readonly=True):
            digest = await _postgres_digest(conn)
    finally:
        await conn.close()
    if digest != expected:
        raise StoreError("verification failed: the card keys in PostgreSQL differ from SQLite")
    say(f"verified: card keys identical on both sides (digest {digest[:16]})")
    return MigrationReport(rows=rows, card_keys_digest=digest)


async def _copy_all(
    src: sqlite3.Connection, conn: Conn, say: Callable[[str], None]
) -> dict[str, int]:
    copied: dict[str, int] = {}
    async with conn.transaction():
        present = await conn.fetchval(
            "SELECT (SELECT COUNT(*) FROM data_keys) + (SELECT COUNT(*) FROM orders)"
            " + (SELECT COUNT(*) FROM card_keys)"
        )
        if present:
            raise StoreError(
                "the target database already holds a ledger; migrate into an empty database"
            )
        for table in TABLES:
            copied[table] = await _copy_table(src, conn, table)
            say(f"{table}: {copied[table]} rows")
            if "id" in await _postgres_columns(conn, table):
                # New rows continue after the copied ids.
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                )
    return copied


async def _copy_table(src: sqlite3.Connection, conn: Conn, table: str) -> int:
    target_types = await _postgres_columns(conn, table)
    source_columns = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
    missing = [c for c in source_columns if c not in target_types]
    if missing:
        raise StoreError(f"{table}: the PostgreSQL schema has no column {', '.join(missing)}")
    floats = [target_types[c] == "double precision" for c in source_columns]
    total = 0
    cursor = src.execute(f"SELECT {', '.join(source_columns)} FROM {table} ORDER BY rowid")
    while batch := cursor.fetchmany(BATCH):
        records = [
            tuple(
                float(v) if is_float and v is not None else v
                for v, is_float in zip(row, floats, strict=True)
            )
            for row in batch
        ]
        await conn.copy_records_to_table(table, records=records, columns=source_columns)
        total += len(records)
    return total


async def _postgres_columns(conn: Conn, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = $1 AND table_schema = current_schema()",
        table,
    )
    return {r[0]: r[1] for r in rows}


class _KeyDigest:
    """A running hash over card key rows, the same for both databases' value types."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, row: Iterable[Any]) -> None:
        for value in row:
            if isinstance(value, bytes | memoryview):
                value = bytes(value)
            self._hash.update(b"\x00" if value is None else repr(value).encode())
        self._hash.update(b"\x1e")

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _sqlite_digest(src: sqlite3.Connection) -> str:
    digest = _KeyDigest()
    for row in src.execute(f"SELECT {KEY_FINGERPRINT_COLUMNS} FROM card_keys ORDER BY id"):
        digest.add(row)
    return digest.hexdigest()


async def _postgres_digest(conn: Conn) -> str:
    digest = _KeyDigest()
    query = f"SELECT {KEY_FINGERPRINT_COLUMNS} FROM card_keys ORDER BY id"
    async for row in conn.cursor(query, prefetch=BATCH):
        digest.add(row)
    return digest.hexdigest()

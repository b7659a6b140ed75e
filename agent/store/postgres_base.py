"""PostgreSQL ledger plumbing: the connection pool, transactions, migrations, leases, the
advisory locks behind singleton jobs, and the keys that seal card keys.

Several agents share one database. Every Store call is one transaction; a call on an order
line first locks that row (and renews this agent's lease on it), so calls on one line
serialize across agents the way the SQLite store serializes them inside one process.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from agent.domain import CardItem, OrderLine
from agent.keybox import KEY_BYTES, KeyBox, unwrap, wrap
from agent.logs import get_logger
from agent.store import identity
from agent.store.base import LedgerError, StoreError
from agent.store.identity import Opening
from agent.store.rows import LINE_COLUMNS, line_from_row, migrations

T = TypeVar("T")
Conn = Any  # asyncpg ships no type information
log = get_logger("kami.store.postgres")

DEFAULT_LEASE_SECONDS = 60.0
# Two agents' transactions can still deadlock on rare paths (say, two pages listing the same
# orders in another order); PostgreSQL aborts one of them, which is then run again whole.
RETRYABLE = ("40001", "40P01")
MAX_TX_ATTEMPTS = 8
MIGRATION_LOCK = 0x6B616D69  # "kami": one agent migrates, the others wait for it
RESEAL_BATCH = 5_000


def default_instance() -> str:
    return socket.gethostname()


def lock_id(name: str) -> int:
    """A stable advisory-lock number for a job name."""
    return zlib.crc32(f"kami-agent:{name}".encode())


class PostgresBase:
    """Plumbing shared by the PostgreSQL ledger modules."""

    def __init__(
        self,
        url: str,
        master_key: bytes,
        *,
        instance: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        pool_size: int = 10,
        password: str | None = None,
        opening: Opening = Opening.OPEN,
    ) -> None:
        """`opening`: CREATE (`kami-agent init`) makes the schema and the ledger id and is
        refused where a ledger is; OPEN also brings the schema up to date and gives a
        ledger made before ids existed its id. No identity file for PostgreSQL (see
        agent/store/identity.py): the id lives in the database."""
        self.url = url
        self._opening = opening
        self.ledger_id: str | None = None
        self._password = password
        self.instance = instance or default_instance()
        self.lease_seconds = lease_seconds
        self._master_key = master_key
        self._pool_size = pool_size
        self._pool: Any = None
        self._keybox: KeyBox | None = None

    # --- connection and transactions ---------------------------------------------------------
    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                password=self._password,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=60,
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL at {safe_url(self.url)}: {exc}"
            ) from exc
        try:
            async with self._pool.acquire() as conn:
                if self._opening is Opening.CREATE:
                    await self._refuse_existing(conn)
                await self._migrate(conn)
            self._keybox = await self._tx(self._load_keys)
            self.ledger_id = await self._tx(self._ledger_id)
            await self._reseal_sku_bound()
        except BaseException:
            await self.close()
            raise
        self._opening = Opening.OPEN

    async def _refuse_existing(self, conn: Conn) -> None:
        tables = await conn.fetchval(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        if tables:
            raise LedgerError(
                f"the database {safe_url(self.url)} already holds tables: `kami-agent init`"
                " makes a new ledger only in an empty database; nothing changed"
            )

    async def _ledger_id(self, conn: Conn) -> str:
        """The ledger's id; given here on `init`, or to a ledger made before ids existed."""
        await conn.execute(f"LOCK TABLE {identity.META_TABLE} IN EXCLUSIVE MODE")
        stored = await conn.fetchval(
            f"SELECT value FROM {identity.META_TABLE} WHERE key = 'ledger_id'"
        )
        if stored is not None:
            return str(stored)
        ledger_id = identity.new_ledger_id()
        await conn.execute(
            f"INSERT INTO {identity.META_TABLE} (key, value) VALUES ('ledger_id', $1)", ledger_id
        )
        if self._opening is not Opening.CREATE:
            log.warning("ledger_adopted", ledger=safe_url(self.url), ledger_id=ledger_id)
        return ledger_id

    async def _reseal_sku_bound(self) -> None:
        """Re-seals rows sealed before rows were bound in (migration 0004), batch by batch;
        agents opening together share the work (SKIP LOCKED)."""

        async def batch(conn: Conn) -> int:
            rows = await conn.fetch(
                "SELECT id, sku, key_id, sealed FROM card_keys WHERE sku_bound_seal IS NOT NULL"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                RESEAL_BATCH,
            )
            if rows and not all(self.keybox.knows(r[2]) for r in rows):
                self._keybox = await self._load_keys(conn)
            for row_id, sku, key_id, sealed in rows:
                item = self.keybox.open_sku_bound(sku, key_id, sealed)
                _, resealed = self.keybox.seal(sku, item, key_id)
                await conn.execute(
                    "UPDATE card_keys SET sealed = $1, sku_bound_seal = NULL WHERE id = $2",
                    resealed,
                    row_id,
                )
            return len(rows)

        resealed = 0
        while count := await self._tx(batch):
            resealed += count
        if resealed:
            log.info("card_keys_resealed", rows=resealed, bound="sku and row")

    def ledger_lost(self) -> str | None:
        """None: a database does not vanish from under an open connection unnoticed (a
        dropped database ends the connections, and every call fails)."""
        return None

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _require(self) -> Any:
        if self._pool is None:
            raise StoreError("store is not open")
        return self._pool

    async def _tx(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Runs fn(conn, *args) in one transaction; durable when it returns (synchronous
        commit). A deadlock or serialization failure runs it again from the start."""
        pool = self._require()
        for attempt in range(1, MAX_TX_ATTEMPTS + 1):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    return await fn(conn, *args)
            except asyncpg.PostgresError as exc:
                if getattr(exc, "sqlstate", None) not in RETRYABLE or attempt == MAX_TX_ATTEMPTS:
                    if isinstance(
                        exc, asyncpg.IntegrityConstraintViolationError | asyncpg.RaiseError
                    ):
                        raise  # a constraint of the ledger said no: the caller's business
                    raise LedgerError(
                        f"the PostgreSQL ledger {safe_url(self.url)} failed: {exc}"
                    ) from exc
                log.info("store_tx_retry", sqlstate=exc.sqlstate, attempt=attempt)
                await asyncio.sleep(random.uniform(0.0, 0.02 * attempt))
        raise AssertionError("unreachable")

    async def _migrate(self, conn: Conn) -> None:
        await migrate_schema(conn)

    @asynccontextmanager
    async def singleton(self, name: str) -> AsyncIterator[bool]:
        """True while this agent holds the job's advisory lock; False if another agent runs
        it now. The lock lives with the session, so a killed agent lets go at once."""
        pool = self._require()
        async with pool.acquire() as conn:
            held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_id(name)))
            try:
                yield held
            finally:
                if held:
                    await conn.execute("SELECT pg_advisory_unlock($1)", lock_id(name))

    # --- sealing keys ------------------------------------------------------------------------
    async def _load_keys(self, conn: Conn) -> KeyBox:
        # Retired data keys are loaded too: another agent may have sealed with one just
        # before a rotation retired it.
        query = "SELECT id, purpose, wrapped, retired_at FROM data_keys ORDER BY id"
        rows = await conn.fetch(query)
        if not rows:  # a new ledger: one hash key for its lifetime, a first data key
            await conn.execute("LOCK TABLE data_keys IN EXCLUSIVE MODE")
            rows = await conn.fetch(query)
            if not rows:
                for purpose in ("hash", "data"):
                    await self._new_key(conn, purpose, time.time())
                rows = await conn.fetch(query)
        keys = {r[0]: unwrap(self._master_key, r[2], f"{r[1]}:{r[0]}".encode()) for r in rows}
        data = [r[0] for r in rows if r[1] == "data"]
        current = [r[0] for r in rows if r[1] == "data" and r[3] is None]
        hash_id = next(r[0] for r in rows if r[1] == "hash")
        return KeyBox({k: keys[k] for k in data}, max(current or data), keys[hash_id])

    async def _new_key(self, conn: Conn, purpose: str, now: float) -> tuple[int, bytes]:
        key = os.urandom(KEY_BYTES)
        key_id = int(
            await conn.fetchval(
                "INSERT INTO data_keys (purpose, wrapped, created_at) VALUES ($1, '', $2)"
                " RETURNING id",
                purpose,
                now,
            )
        )
        await conn.execute(
            "UPDATE data_keys SET wrapped = $1 WHERE id = $2",
            wrap(self._master_key, key, f"{purpose}:{key_id}".encode()),
            key_id,
        )
        return key_id, key

    @property
    def keybox(self) -> KeyBox:
        if self._keybox is None:
            raise StoreError("store is not open")
        return self._keybox

    async def _fresh_keybox(self, conn: Conn) -> KeyBox:
        """The keybox, reloaded if another agent rotated the data key since we loaded it."""
        newest = await conn.fetchval(
            "SELECT MAX(id) FROM data_keys WHERE purpose = 'data' AND retired_at IS NULL"
        )
        if newest is not None and newest != self.keybox.current:
            self._keybox = await self._load_keys(conn)
        return self.keybox

    async def _key_rows(
        self, conn: Conn, sku: str, items: Sequence[CardItem], source: str, now: float
    ) -> list[tuple[Any, ...]]:
        box = await self._fresh_keybox(conn)
        rows = []
        for item in items:
            key_id, sealed = box.seal(sku, item)
            rows.append((sku, key_id, sealed, box.digest(item), source, now))
        return rows

    async def _open_rows(self, conn: Conn, rows: Sequence[Any]) -> list[CardItem]:
        """(sku, key_id, sealed, secret_hash) rows -> card keys."""
        if not all(self.keybox.knows(r[1]) for r in rows):
            self._keybox = await self._load_keys(conn)
        return [self.keybox.open(r[0], r[1], r[2], r[3]) for r in rows]

    # --- rows shared by the ledger modules ----------------------------------------------------
    async def _lock_line(self, conn: Conn, line_id: int, now: float) -> OrderLine:
        """Locks the line's row for this transaction and takes (or renews) the lease on it."""
        row = await conn.fetchrow(
            f"UPDATE orders SET claimed_by = $2, lease_until = $3 WHERE id = $1"
            f" RETURNING {LINE_COLUMNS}",
            line_id,
            self.instance,
            now + self.lease_seconds,
        )
        if row is None:
            raise StoreError(f"no order line with id {line_id}")
        return line_from_row(row)

    @staticmethod
    async def _fetch_line(conn: Conn, line_id: int) -> OrderLine:
        row = await conn.fetchrow(f"SELECT {LINE_COLUMNS} FROM orders WHERE id = $1", line_id)
        if row is None:
            raise StoreError(f"no order line with id {line_id}")
        return line_from_row(row)

    @staticmethod
    async def _event(conn: Conn, line_id: int, kind: str, detail: str, now: float) -> None:
        await conn.execute(
            "INSERT INTO events (order_line_id, at, kind, detail) VALUES ($1, $2, $3, $4)",
            line_id,
            now,
            kind,
            detail,
        )

    @staticmethod
    async def _events(conn: Conn, events: Sequence[tuple[int, str, str]], now: float) -> None:
        """(line id, kind, detail) events in one statement, in order."""
        if not events:
            return
        await conn.execute(
            "INSERT INTO events (order_line_id, at, kind, detail)"
            " SELECT e.line_id, $1, e.kind, e.detail"
            " FROM unnest($2::bigint[], $3::text[], $4::text[]) WITH ORDINALITY"
            " AS e(line_id, kind, detail, n) ORDER BY e.n",
            now,
            [e[0] for e in events],
            [e[1] for e in events],
            [e[2] for e in events],
        )

    @staticmethod
    async def _refunding(conn: Conn, line_id: int) -> bool:
        key = await conn.fetchval("SELECT refund_key FROM orders WHERE id = $1", line_id)
        return key is not None

    async def integrity_check(self) -> str:
        async def run(conn: Conn) -> str:
            # The invariants the schema cannot state on its own.
            short = await conn.fetchval(
                "SELECT COUNT(*) FROM orders o WHERE o.state IN ('allocated', 'delivering',"
                " 'delivered') AND (SELECT COUNT(*) FROM card_keys k WHERE k.order_line_id ="
                " o.id) != o.quantity"
            )
            if short:
                return f"{short} delivered or allocated lines do not hold exactly their quantity"
            return "ok"

        return await self._tx(run)


async def migrate_schema(conn: Conn) -> None:
    """Brings the schema up to date. Agents starting together: the first migrates, the
    others wait on the lock and then find nothing to do."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = await conn.fetchval("SELECT MAX(version) FROM schema_version") or 0
        for version, sql in migrations("postgres"):
            if version <= current:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
            log.info("store_migrated", version=version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"

"""The PostgreSQL engine of the ledger, for several agents sharing one stock (the bodies are
agent/store/ledger/, written once; tests/contract/test_store_contract.py runs both engines).

Each call is one transaction at READ COMMITTED from a pool; reads are read-only
transactions. What agents sharing the ledger need lives here: a call on an order line first
locks its row and takes (or renews) this agent's lease on it (claimed_by, lease_until), so
calls on one line serialize across agents the way the SQLite engine serializes them in one
process, and other agents leave the line alone until the lease runs out; free keys are taken
FOR UPDATE SKIP LOCKED (keys another agent is binding are not ours to wait for); batches of
rows are one statement over `unnest` of arrays; singleton jobs hold advisory locks.
"""

from __future__ import annotations

import asyncio
import random
import socket
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from agent.domain import OrderLine, PlatformOrder, RejectedOrder
from agent.logs import get_logger
from agent.store import guards
from agent.store.base import (
    LedgerBusy,
    LedgerContention,
    LedgerDataError,
    LedgerError,
    LedgerRefused,
    LedgerUnavailable,
    StoreError,
)
from agent.store.identity import Opening
from agent.store.ledger.core import Body, read
from agent.store.ledger.responder import ResponderLedger
from agent.store.ledger.stock import Ledger
from agent.store.rows import DEMAND_BUCKET_SECONDS, LINE_COLUMNS, line_from_row, migrations
from agent.store.tx import Bulk, Row, _Slot, fill, render_bulk_postgres, rows_changed

T = TypeVar("T")
log = get_logger("kami.store.postgres")

DEFAULT_LEASE_SECONDS = 60.0
# Two agents' transactions can still deadlock on rare paths (say, two pages listing the same
# orders in another order); PostgreSQL aborts one of them, which is then run again whole.
MAX_TX_ATTEMPTS = 8
# How often a held singleton lock's connection is asked whether it is still alive: the
# longest two agents may both run a singleton job after the server dropped the holder's
# session (agent/store/postgres.py: singleton).
LOCK_CHECK_SECONDS = 2.0
MIGRATION_LOCK = 0x6B616D69  # "kami": one agent migrates, the others wait for it
# What asyncpg raises for a value the database cannot take: text with no UTF-8 (a lone
# surrogate, refused by the driver), NUL (refused by the server), a number out of range.
DATA_ERRORS = (asyncpg.DataError, UnicodeError, OverflowError)
_DRIVER = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError, *DATA_ERRORS)


def default_instance() -> str:
    return socket.gethostname()


def lock_id(name: str) -> int:
    """A stable advisory-lock number for a job name."""
    return zlib.crc32(f"kami-agent:{name}".encode())


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class PgTx:
    """The contract of agent/store/tx.py over one asyncpg connection in a transaction."""

    __slots__ = ("_conn", "_store")

    def __init__(self, conn: Any, store: PostgresStore) -> None:
        self._conn = conn
        self._store = store

    async def _call(self, method: str, sql: str, args: Sequence[Any]) -> Any:
        """The connection's `method` run on rendered `sql`, driver errors mapped."""
        try:
            return await getattr(self._conn, method)(sql, *args)
        except _DRIVER as exc:
            raise self._store._map(exc) from exc

    async def execute(self, sql: str, *args: Any) -> int:
        return rows_changed(await self._call("execute", self._store._render(sql), args))

    async def executemany(self, bulk: Bulk, rows: Sequence[Sequence[Any]]) -> int:
        if not rows:
            return 0
        columns = [list(c) for c in zip(*rows, strict=True)]
        status = await self._call("execute", self._store._render_bulk(bulk, None), columns)
        return rows_changed(status)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._call("fetch", self._store._render(sql), args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._call("fetchrow", self._store._render(sql), args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._call("fetchval", self._store._render(sql), args)

    async def insert(self, sql: str, *args: Any) -> int | None:
        value = await self.fetchval(sql + " RETURNING id", *args)
        return None if value is None else int(value)

    async def insert_many(
        self, bulk: Bulk, rows: Sequence[Sequence[Any]], key: int
    ) -> list[int | None]:
        if not rows:
            return []
        columns = [list(c) for c in zip(*rows, strict=True)]
        found = await self._call("fetch", self._store._render_bulk(bulk, key), columns)
        ids = {r[1]: int(r[0]) for r in found}
        return [ids.get(row[key]) for row in rows]


class PostgresStore(Ledger, ResponderLedger):
    """The Store port on one PostgreSQL database shared by agents (see the module docstring)."""

    _data_errors = DATA_ERRORS
    # Another agent may be inserting some of the same orders: keys are taken only for the
    # lines this one inserted.
    _keys_before_insert = False

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
        self._keybox = None
        self._by = f" by {self.instance}"
        me, secs = _literal(self.instance), repr(float(lease_seconds))
        self._slots: dict[str, object] = {
            "skip_locked": " FOR UPDATE SKIP LOCKED",
            "for_update": " FOR UPDATE",
            "release": ", lease_until = NULL",
            "release_ours": f", claimed_by = {me}, lease_until = NULL",
            "lease_columns": ", claimed_by, lease_until",
            "lease_values": _Slot(lambda now: f", {me}, ${now} + {secs}"),
            "lease": _Slot(lambda now: f"claimed_by = {me}, lease_until = ${now} + {secs}"),
            "lease_free": _Slot(
                lambda now: (
                    f" AND (lease_until IS NULL OR lease_until <= ${now} OR claimed_by = {me})"
                )
            ),
            "bucket": f"floor(seen_at / {DEMAND_BUCKET_SECONDS})",
            "orders_by_seen": "orders",
            "orders_delivered": "orders",
        }
        self._sql: dict[Any, str] = {}

    def _render(self, template: str) -> str:
        sql = self._sql.get(template)
        if sql is None:
            sql = self._sql[template] = fill(template, self._slots)
        return sql

    def _render_bulk(self, bulk: Bulk, key: int | None) -> str:
        sql = self._sql.get((bulk, key))
        if sql is None:
            sql = self._sql[(bulk, key)] = render_bulk_postgres(bulk, self._slots, key)
        return sql

    # --- errors -------------------------------------------------------------------------------
    def _map(self, exc: BaseException) -> BaseException:
        """A driver error, in words, as an error of the AgentError tree."""
        state = str(getattr(exc, "sqlstate", "") or "")
        where = f"the PostgreSQL ledger {safe_url(self.url)}"
        if isinstance(exc, DATA_ERRORS) or (
            isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError)
        ):
            return LedgerDataError(f"{where} cannot store a value: {exc}")
        if isinstance(exc, asyncpg.IntegrityConstraintViolationError | asyncpg.RaiseError):
            return LedgerRefused(f"{where} refused the write: {exc}")
        if state in ("40001", "40P01"):
            return LedgerContention(f"{where} failed: {exc}")
        if state in ("55P03", "57014"):
            return LedgerBusy(f"{where} is busy: {exc}")
        if (
            state.startswith("08")
            or state.startswith("57P")
            or isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError)
        ):
            return LedgerUnavailable(f"{where} cannot be reached: {exc}")
        if isinstance(exc, asyncpg.PostgresError):
            return LedgerError(f"{where} failed: {exc}")
        return exc

    # --- transactions -------------------------------------------------------------------------
    def _require(self) -> Any:
        if self._pool is None:
            raise StoreError("store is not open")
        return self._pool

    async def _write(self, body: Body[T]) -> T:
        """Runs body(tx) in one transaction; durable when it returns (synchronous commit).
        A deadlock or serialization failure runs it again from the start."""
        return await self._run(body, readonly=False)

    async def _read(self, body: Body[T]) -> T:
        """Runs body(tx) in one read-only transaction."""
        return await self._run(body, readonly=True)

    async def _run(self, body: Body[T], *, readonly: bool) -> T:
        pool = self._require()
        for attempt in range(1, MAX_TX_ATTEMPTS + 1):
            try:
                try:
                    async with pool.acquire() as conn, conn.transaction(readonly=readonly):
                        return await body(PgTx(conn, self))
                except _DRIVER as exc:  # outside a statement: acquire, BEGIN, COMMIT
                    raise self._map(exc) from exc
            except LedgerContention as exc:
                if attempt == MAX_TX_ATTEMPTS:
                    raise
                log.info("store_tx_retry", error=str(exc.__cause__), attempt=attempt)
                await asyncio.sleep(random.uniform(0.0, 0.02 * attempt))
        raise AssertionError("unreachable")

    # --- the engine's hooks (leases, locks) --------------------------------------------------
    async def _lock_line(self, tx: Any, line_id: int, now: float) -> OrderLine:
        """Locks the line's row for this transaction and takes (or renews) the lease on it."""
        row = await tx.fetchrow(
            f"UPDATE orders SET {{lease:2}} WHERE id = $1 RETURNING {LINE_COLUMNS}",
            line_id,
            now,
        )
        if row is None:
            raise StoreError(f"no order line with id {line_id}")
        return line_from_row(row)

    async def _lease(self, tx: Any, line_ids: Sequence[int], now: float) -> None:
        if line_ids:
            await tx.execute(
                "UPDATE orders SET {lease:1} WHERE id = ANY($2::bigint[])",
                now,
                list(line_ids),
            )

    async def _lock_table(self, tx: Any, table: str) -> None:
        await tx.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")

    def _intake_order(
        self, orders: Sequence[PlatformOrder | RejectedOrder]
    ) -> Sequence[PlatformOrder | RejectedOrder]:
        # One order of inserts for every agent, so two agents taking in the same page wait
        # for each other instead of deadlocking.
        return sorted(orders, key=lambda o: o.order_id)

    async def take_line(self, line_id: int, now: float) -> OrderLine | None:
        """The line, leased to this agent; None if another agent holds it (or it is gone)."""

        async def take(tx: Any) -> OrderLine | None:
            row = await tx.fetchrow(
                f"UPDATE orders SET {{lease:1}} WHERE id = $2"
                f"{{lease_free:1}} RETURNING {LINE_COLUMNS}",
                now,
                line_id,
            )
            return None if row is None else line_from_row(row)

        return await self._write(take)

    @asynccontextmanager
    async def singleton(self, name: str) -> AsyncIterator[bool]:
        """True while this agent holds the job's advisory lock; False if another agent runs
        it now. The lock lives with the session, so a killed agent lets go at once.

        A lock held for long (the stock-sync leader holds it for as long as it runs) is
        lost with its connection: the server ended the session (a restart, an idle or
        network timeout) and another agent may take the job at once. So the connection is
        asked every `LOCK_CHECK_SECONDS`; once it does not answer, the body is cancelled and
        the block ends as if it had returned (the job is tried again by its caller's loop)."""
        pool = self._require()
        async with pool.acquire() as conn:
            held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_id(name)))
            if not held:
                yield False
                return
            lost = False
            try:
                async with asyncio.timeout(None) as lease:
                    watch = asyncio.create_task(self._watch_lock(conn, name, lease))
                    try:
                        yield True
                    finally:
                        watch.cancel()
            except TimeoutError:
                if not lease.expired():
                    raise  # the body's own
                lost = True
                log.error("singleton_lock_lost", job=name, action="stopped the job")
            finally:
                if not lost:
                    await conn.execute("SELECT pg_advisory_unlock($1)", lock_id(name))

    @staticmethod
    async def _watch_lock(conn: Any, name: str, lease: asyncio.Timeout) -> None:
        """Ends the lease (cancelling the body) once the lock's connection stops answering."""
        while True:
            await asyncio.sleep(LOCK_CHECK_SECONDS)
            try:
                async with asyncio.timeout(LOCK_CHECK_SECONDS):
                    await conn.fetchval("SELECT 1")
            except (TimeoutError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                log.warning("singleton_lock_check_failed", job=name, error=type(exc).__name__)
                lease.reschedule(asyncio.get_running_loop().time())
                return

    @read
    async def integrity_check(self, tx: Any) -> str:
        """The invariants the schema cannot state on its own: 'ok', or what is wrong."""
        short = await tx.fetchval(
            "SELECT COUNT(*) FROM orders o WHERE o.state IN {line_class:holds_keys} AND"
            " (SELECT COUNT(*) FROM card_keys k WHERE k.order_line_id = o.id) != o.quantity"
        )
        if short:
            return f"{short} delivered or allocated lines do not hold exactly their quantity"
        return "ok"

    def ledger_lost(self) -> str | None:
        """None: a database does not vanish from under an open connection unnoticed (a
        dropped database ends the connections, and every call fails)."""
        return None

    # --- open and close -----------------------------------------------------------------------
    async def open(self) -> None:
        """Connects, brings the schema and its guards up to date, loads the sealing keys."""
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
                await migrate_schema(conn, with_guards=True)
            self._keybox = await self._write(self._load_keys)
            self.ledger_id, given = await self._write(lambda tx: self._ledger_id(tx, True))
            if given and self._opening is not Opening.CREATE:
                log.warning("ledger_adopted", ledger=safe_url(self.url), ledger_id=self.ledger_id)
            await self._reseal_sku_bound()
        except BaseException:
            await self.close()
            raise
        self._opening = Opening.OPEN

    async def _refuse_existing(self, conn: Any) -> None:
        tables = await conn.fetchval(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        if tables:
            raise LedgerError(
                f"the database {safe_url(self.url)} already holds tables: `kami-agent init`"
                " makes a new ledger only in an empty database; nothing changed"
            )

    async def close(self) -> None:
        """Closes the pool."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


async def migrate_schema(conn: Any, *, with_guards: bool = False) -> None:
    """Brings the schema (and, for a store, its lifecycle guards) up to date. Agents
    starting together: the first migrates, the others wait on the lock, then find nothing
    to do. migrate-store copies rows in before the guards are made (they refuse inserting a
    line in most states)."""
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
        wanted = guards.postgres_version()
        installed = await conn.fetchval(
            "SELECT obj_description(to_regproc('lifecycle_refused'), 'pg_proc')"
        )
        if with_guards and installed != wanted:
            async with conn.transaction():
                for statement in guards.postgres_statements():
                    await conn.execute(statement)
                await conn.execute(f"COMMENT ON FUNCTION lifecycle_refused() IS '{wanted}'")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


__all__ = ["PostgresStore", "lock_id", "migrate_schema", "safe_url"]

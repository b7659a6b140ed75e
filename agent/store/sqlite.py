"""The SQLite engine of the ledger (agent/store/ledger/ holds the bodies, written once).

Writes: one connection, whose transactions a worker thread begins and commits (BEGIN
IMMEDIATE may wait for another process's lock; COMMIT is the fsync) while the statements run
right on the event loop: they take microseconds, and another thread would cost a GIL
hand-over each. Calls arriving during a commit share the next one (group commit), each in a
SAVEPOINT of its own, so one call's failure rolls back only that call, and a call returns
only after the COMMIT that carries it: durable when it returns, nothing of it when it
raises. WAL + synchronous=FULL: a SIGKILL at any point leaves a whole call or nothing.

Reads: a second connection on a thread of its own, in deferred transactions, which never
take the write lock: listing a million keys holds no writer up, in this process or another.

Only `kami-agent init` (Opening.CREATE) makes a ledger file; every other open refuses a
missing, empty, foreign or replaced ledger (agent/store/identity.py), and driver errors end
as errors of the AgentError tree that name the ledger and what is wrong with it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

from agent.domain import OrderLine
from agent.logs import get_logger
from agent.store import bound_journal, guards, identity
from agent.store.base import (
    LedgerBusy,
    LedgerDataError,
    LedgerError,
    LedgerRefused,
    StoreError,
)
from agent.store.identity import Opening
from agent.store.ledger.core import STORED_ID, Body, read
from agent.store.ledger.responder import ResponderLedger
from agent.store.ledger.stock import Ledger
from agent.store.rows import DEMAND_BUCKET_SECONDS, migrations
from agent.store.tx import (
    Bulk,
    Expanding,
    Row,
    _Slot,
    chunk_sizes,
    render_bulk_sqlite,
    render_sqlite,
)

T = TypeVar("T")
log = get_logger("kami.store.sqlite")
_Op = tuple[Body[Any], "asyncio.Future[Any]"]  # a queued write and the future its caller awaits
# What sqlite3 raises for a value it cannot take: text with no UTF-8 (a lone surrogate), an
# integer past 64 bits.
DATA_ERRORS = (UnicodeError, OverflowError, sqlite3.DataError)
_DRIVER = (sqlite3.Error, *DATA_ERRORS)
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_NONE = _Slot(lambda _: "")
SLOTS: dict[str, object] = {
    # One writer at a time: no row locks, no leases.
    **dict.fromkeys(("skip_locked", "for_update", "release", "release_ours"), ""),
    **dict.fromkeys(("lease_columns",), ""),
    **dict.fromkeys(("lease_free", "lease_values"), _NONE),
    "bucket": f"CAST(seen_at / {DEMAND_BUCKET_SECONDS} AS INTEGER)",
    # Unprompted, the planner walks the (sku, state) index for demand's GROUP BY, through
    # every order ever taken in.
    "orders_by_seen": "orders INDEXED BY orders_seen",
    # The console's delivered-since count: the delivered state's partial index by time, not
    # a walk of every order ever delivered.
    "orders_delivered": "orders INDEXED BY orders_delivered",
}
# List values bound in one statement. sqlite3 keeps every statement it prepared in its
# cache (128 a connection), each holding its program for the process's life: one with
# 20,000 list values held 4 MB there (the import's two lookups: 8 MB of the flash sale's
# peak RSS), one with 1,024 holds 0.2 MB. A page of 1,000 orders still runs whole.
LIST_CHUNK = 1_024
BULK_CHUNK = 64  # rows of a Bulk statement run as one statement (at most 64 x its parameters)


def drive(body: Coroutine[Any, Any, T]) -> T:
    """Runs a SQLite body to its end, here and now: its statements never wait for anything
    (sqlite3 answers at once), so the coroutine finishes on its first step."""
    try:
        body.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    body.close()
    raise RuntimeError("a SQLite ledger body waited for something, which it must not")


class SQLiteTx:
    """The contract of agent/store/tx.py over one sqlite3 connection: a shim over
    conn.execute, the statement rendered once and cached."""

    __slots__ = ("_conn", "_fail", "_sql")

    def __init__(self, conn: sqlite3.Connection, sql: dict[Any, Any], fail: Any) -> None:
        self._conn = conn
        self._sql = sql
        self._fail = fail

    def _statement(self, template: str) -> str | Expanding:
        sql = self._sql.get(template)
        if sql is None:
            sql = self._sql[template] = render_sqlite(template, SLOTS)
        return sql

    def _run(self, template: str, args: tuple[Any, ...]) -> list[sqlite3.Cursor]:
        """The statement run with the arguments, in chunks if a long list asks for it."""
        sql = self._statement(template)
        if isinstance(sql, str):
            return [self._conn.execute(sql, args)]
        return [self._conn.execute(*sql.expand(a)) for a in sql.chunks(args, LIST_CHUNK)]

    def _one(self, template: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        sql = self._statement(template)
        if isinstance(sql, str):
            return self._conn.execute(sql, args)
        return self._conn.execute(*sql.expand(args))

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            return sum(cur.rowcount for cur in self._run(sql, args))
        except _DRIVER as exc:
            raise self._fail(exc) from exc

    def _bulk(
        self, bulk: Bulk, rows: Sequence[Sequence[Any]], key: int | None
    ) -> Iterator[sqlite3.Cursor]:
        """The rows through the Bulk statement set-wise, a chunk per statement (tx.py)."""
        start = 0
        for size in chunk_sizes(len(rows), BULK_CHUNK):
            sql = self._sql.get((bulk, size, key))
            if sql is None:
                sql = self._sql[(bulk, size, key)] = render_bulk_sqlite(bulk, SLOTS, size, key)
            yield self._conn.execute(sql, list(chain.from_iterable(rows[start : start + size])))
            start += size

    async def executemany(self, bulk: Bulk, rows: Sequence[Sequence[Any]]) -> int:
        try:
            return sum(cur.rowcount for cur in self._bulk(bulk, rows, None))
        except _DRIVER as exc:
            raise self._fail(exc) from exc

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        try:
            return list(chain.from_iterable(cur.fetchall() for cur in self._run(sql, args)))
        except _DRIVER as exc:
            raise self._fail(exc) from exc

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        try:
            return self._one(sql, args).fetchone()
        except _DRIVER as exc:
            raise self._fail(exc) from exc

    async def fetchval(self, sql: str, *args: Any) -> Any:
        try:
            row = self._one(sql, args).fetchone()
        except _DRIVER as exc:
            raise self._fail(exc) from exc
        return None if row is None else row[0]

    async def insert(self, sql: str, *args: Any) -> int | None:
        try:
            cur = self._one(sql, args)
        except _DRIVER as exc:
            raise self._fail(exc) from exc
        return cur.lastrowid if cur.rowcount else None

    async def insert_many(
        self, bulk: Bulk, rows: Sequence[Sequence[Any]], key: int
    ) -> list[int | None]:
        try:
            ids = {r[1]: r[0] for cur in self._bulk(bulk, rows, key) for r in cur.fetchall()}
        except _DRIVER as exc:
            raise self._fail(exc) from exc
        return [ids.get(row[key]) for row in rows]


@contextmanager
def exclusive_ledger(path: Path) -> Iterator[None]:
    """Held by the daemon for as long as it runs on a SQLite ledger: a second daemon on the
    same file, or migrate-store while one runs, is refused instead of racing it. A path
    that holds no ledger is refused before a lock file is made beside it."""
    identity.check_ledger_file(path)
    try:
        fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        raise LedgerError(
            f"cannot create the lock file {path}.lock beside the ledger"
            f" ({identity.os_error_text(f'{path}.lock', exc).split(': ', 1)[1]}): the"
            " ledger's directory must be writable by the agent"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"the ledger {path} is in use by a running agent (stop it first:"
                " systemctl stop kami-agent)"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor lets go of the lock


class SQLiteStore(Ledger, ResponderLedger):
    """The Store port on one SQLite file (see the module docstring)."""

    _data_errors = DATA_ERRORS

    def __init__(
        self,
        path: Path | str,
        master_key: bytes,
        *,
        opening: Opening = Opening.OPEN,
        startup_checks: bool = False,
    ) -> None:
        """`opening`: CREATE makes a new ledger (refused where one is), and is spent by the
        first open; `startup_checks`: the daemon's, at open: SQLite's quick_check, and a
        write (a command that only reads may read a read-only ledger; the daemon must not
        start on one and fail at its first order)."""
        self.path = Path(path)
        self._master_key = master_key
        self._opening = opening
        self._startup_checks = startup_checks
        self.ledger_id: str | None = None
        self._file: os.stat_result | None = None  # the ledger file opened, to see it replaced
        self._keybox = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kami-sqlite")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kami-sqlite-read")
        self._conn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._sql: dict[Any, Any] = {}
        self._wtx: SQLiteTx | None = None
        self._rtx: SQLiteTx | None = None
        self._pending: list[_Op] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None
        self._conn_lock = asyncio.Lock()  # a batch, or one _call, uses the connection
        self._made = False
        self._keeper: bound_journal.JournalKeeper | None = None
        # What the open found in the bound-keys journal past the ledger's own history (a
        # ledger restored from an older backup): the daemon alerts on it.
        self.reconciled = bound_journal.Reconciled()

    # --- errors -------------------------------------------------------------------------------
    def _map(self, exc: BaseException) -> BaseException:
        """A driver error, in words, as an error of the AgentError tree."""
        if isinstance(exc, DATA_ERRORS):
            return LedgerDataError(f"the ledger {self.path} cannot store a value: {exc}")
        if isinstance(exc, sqlite3.IntegrityError):
            return LedgerRefused(f"the ledger {self.path} refused the write: {exc}")
        if isinstance(exc, sqlite3.Error):
            busy = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in _BUSY
            text = identity.sqlite_error_text(self.path, exc)
            return LedgerBusy(text) if busy else LedgerError(text)
        if isinstance(exc, OSError):
            return LedgerError(identity.os_error_text(self.path, exc))
        return exc

    # --- transactions -------------------------------------------------------------------------
    async def _call(self, fn: Any, *args: Any) -> Any:
        """Runs fn on the ledger thread, never while a group-commit batch holds the connection."""
        async with self._conn_lock:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)
            except (*_DRIVER, OSError) as exc:
                raise self._map(exc) from exc

    async def _write(self, body: Body[T]) -> T:
        """Runs body(tx) atomically and durably, sharing the commit with other calls (see the
        module docstring: group commit)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((body, future))
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        """One batch at a time: BEGIN and COMMIT on the ledger thread, the calls between
        them here on the event loop."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                async with self._conn_lock:
                    try:
                        await loop.run_in_executor(self._writer, self._execute, "BEGIN IMMEDIATE")
                        outcomes = self._run_batch(batch)
                        await loop.run_in_executor(self._writer, self._commit)
                    except BaseException as exc:  # no COMMIT: nothing of the batch is durable
                        self._rollback()
                        outcomes = [(False, self._map(exc))] * len(batch)
                for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flushing = False

    def _execute(self, sql: str) -> None:
        self._require().execute(sql)

    def _commit(self) -> None:
        """COMMIT, then the keys it let out appended to the bound-keys journal (fsync)
        before any caller sees them (agent/store/bound_journal.py)."""
        conn = self._require()
        keeper = self._keeper
        notes = keeper.before_commit(conn) if keeper is not None else None
        conn.execute("COMMIT")
        if notes:
            keeper.after_commit(notes)  # type: ignore[union-attr]

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            conn.execute("ROLLBACK")

    def _run_batch(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        conn = self._require()
        tx = self._wtx
        outcomes: list[tuple[bool, Any]] = []
        for body, _ in batch:
            conn.execute("SAVEPOINT op")
            try:
                outcomes.append((True, drive(body(tx))))  # type: ignore[arg-type]
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                outcomes.append((False, exc))
            conn.execute("RELEASE op")
        return outcomes

    async def _write_alone(self, body: Body[T]) -> T:
        """A long write in its own transaction, on the ledger thread (an import batch seals
        thousands of keys: the event loop stays free meanwhile)."""
        result: T = await self._call(self._run_alone, body)
        return result

    def _run_alone(self, body: Body[T]) -> T:
        conn = self._require()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result: T = drive(body(self._wtx))  # type: ignore[arg-type]
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._commit()
        return result

    async def _read(self, body: Body[T]) -> T:
        """Runs body(tx) in a deferred transaction on the read connection, on its thread."""
        if self._rconn is None:
            raise StoreError("store is not open")
        loop = asyncio.get_running_loop()
        try:
            result: T = await loop.run_in_executor(self._reader, self._run_read, body)
        except (*_DRIVER, OSError) as exc:
            raise self._map(exc) from exc
        return result

    def _run_read(self, body: Body[T]) -> T:
        conn = self._rconn
        assert conn is not None
        conn.execute("BEGIN")
        try:
            result: T = drive(body(self._rtx))  # type: ignore[arg-type]
            return result
        finally:
            conn.execute("ROLLBACK")

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    # --- the engine's own parts of the port ---------------------------------------------------
    async def take_line(self, line_id: int, now: float) -> OrderLine | None:
        """The line: one agent per SQLite ledger, every line is ours."""
        return await self.get_line(line_id)

    @asynccontextmanager
    async def singleton(self, name: str) -> AsyncIterator[bool]:
        """Always True: one agent per SQLite ledger."""
        yield True

    @read
    async def integrity_check(self, tx: Any) -> str:
        """SQLite's integrity_check of every page and index: 'ok', or the first problem."""
        return str(await tx.fetchval("PRAGMA integrity_check"))

    def ledger_lost(self) -> str | None:
        """Why the file at our path is not the ledger we opened any more, or None."""
        if self._file is None:
            return None
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return f"the ledger file {self.path} was deleted while the agent ran"
        except OSError as exc:
            return identity.os_error_text(self.path, exc)
        if (now.st_dev, now.st_ino) != (self._file.st_dev, self._file.st_ino):
            return f"the ledger file {self.path} was replaced by another file while the agent ran"
        return None

    # --- open and close -----------------------------------------------------------------------
    async def open(self) -> None:
        """Opens (or, with Opening.CREATE, makes) the ledger, checked and brought up to date."""
        if self._writer._shutdown:  # reopened after close()
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="kami-sqlite")
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="kami-sqlite-read")
        stored_id, adopt = await self._call(self._open)
        try:
            self._keybox = await self._write(self._load_keys)
            if self._opening is Opening.CREATE or adopt:
                self.ledger_id, _ = await self._write(lambda tx: self._ledger_id(tx, True))
                assert self.ledger_id is not None
                identity.write_identity(self.path, self.ledger_id)
                if adopt:
                    log.warning("ledger_adopted", ledger=str(self.path), ledger_id=self.ledger_id)
            else:
                self.ledger_id = stored_id
            adopt_journal = self._opening is Opening.RECORD_IDENTITY
            self._keeper, self.reconciled = await self._call(self._keep_journal, adopt_journal)
            if self._startup_checks:
                await self._write(self._note_start)
            await self._reseal_sku_bound()
        except BaseException:
            await self._call(self._abandon)
            raise
        self._opening = Opening.OPEN  # a created ledger is an existing one from now on

    def _open(self) -> tuple[str | None, bool]:
        """On the ledger thread: the file's checks, the connections, the schema. Returns
        the id stored in the ledger and whether it must be adopted (made before ids)."""
        creating = self._opening is Opening.CREATE
        self._made = False
        try:
            if creating:
                self._made = self._create_file()
            else:
                identity.check_ledger_file(self.path)
            conn = self._connect()
            if not creating:
                self._refuse_foreign(conn)
            self._configure(conn)
            stored = self._stored_id(conn)
            adopt = False if creating else identity.compare(self.path, stored, self._recorded_id())
            self._migrate(conn)
            self._install_guards(conn)
            self._rconn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._rconn.execute("PRAGMA query_only=ON")
            self._rconn.execute("PRAGMA busy_timeout=10000")
            self._rtx = SQLiteTx(self._rconn, self._sql, self._map)
            return stored, adopt
        except BaseException:
            self._abandon()
            raise

    def _keep_journal(
        self, adopt: bool
    ) -> tuple[bound_journal.JournalKeeper, bound_journal.Reconciled]:
        assert self.ledger_id is not None
        return bound_journal.keep(self._require(), self.path, self.ledger_id, adopt)

    def _abandon(self) -> None:
        self._disconnect()
        if self._made:  # a half-made ledger (ours alone) must not block the next `init`
            for suffix in ("", "-wal", "-shm", bound_journal.SUFFIX):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _create_file(self) -> bool:
        beside = (identity.identity_path(self.path), bound_journal.journal_path(self.path))
        found = next((p for p in (self.path, *beside) if p.exists()), None)
        if found is not None:
            raise LedgerError(
                f"{found} already exists: `kami-agent init` makes a new ledger only where"
                " there is none; nothing changed"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Card keys are money: the ledger is readable by its owner only.
        os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True

    def _connect(self) -> sqlite3.Connection:
        before = os.stat(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn = conn
        self._wtx = SQLiteTx(conn, self._sql, self._map)
        # The file SQLite opened: the daemon compares it with the path while it runs.
        self._file = os.stat(self.path)
        if (before.st_dev, before.st_ino) != (self._file.st_dev, self._file.st_ino):
            raise LedgerError(f"the ledger {self.path} was replaced while being opened")
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        # Group commit runs each call in a savepoint, whose undo copies of the pages it
        # touches would otherwise go to a temporary file: a write per page in a flash sale.
        # They are only needed until COMMIT (crash safety is the WAL's job).
        conn.execute("PRAGMA temp_store=MEMORY")
        if self._startup_checks:
            # SQLite's quick_check: every page and b-tree sound (not the index contents,
            # which `kami-agent check` verifies with the full integrity_check).
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise LedgerError(
                    f"the ledger {self.path} is damaged (quick_check: {problems[0]}): restore"
                    " it from backup"
                )

    def _recorded_id(self) -> str | None:
        recorded = identity.read_identity(self.path)
        if recorded is None and self._opening is Opening.RECORD_IDENTITY:
            # `init --adopt`: the operator vouches for this ledger; record its id again.
            stored = self._stored_id(self._require())
            if stored is None:  # a ledger made before ids: adopted the usual way
                return None
            identity.write_identity(self.path, stored)
            log.warning("ledger_identity_recorded", ledger=str(self.path), ledger_id=stored)
            return stored
        return recorded

    def _refuse_foreign(self, conn: sqlite3.Connection) -> None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "schema_version" not in tables:
            what = "an empty SQLite database" if not tables else "an SQLite database"
            raise LedgerError(
                f"{self.path} is {what}, not a kami-agent ledger: restore the ledger from"
                " backup, or correct [store] path"
            )

    @staticmethod
    def _stored_id(conn: sqlite3.Connection) -> str | None:
        try:
            row = conn.execute(STORED_ID).fetchone()
        except sqlite3.OperationalError:  # no such table: a ledger made before ids existed
            return None
        return None if row is None else str(row[0])

    @staticmethod
    async def _note_start(tx: Any) -> None:
        await tx.execute(
            f"INSERT INTO {identity.META_TABLE} (key, value) VALUES ('daemon_started_at', $1)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            repr(time.time()),
        )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
        for version, sql in migrations():
            if version <= current:
                continue
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{sql}\n"
                    f"INSERT INTO schema_version (version) VALUES ({version});\nCOMMIT;"
                )
            except sqlite3.Error:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _install_guards(conn: sqlite3.Connection) -> None:
        """The lifecycle triggers, made again from agent/lifecycle.py where the ledger's
        differ (nothing is written when they are the same: a read-only ledger opens)."""
        have = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
        wanted = guards.sqlite_triggers()
        if all(have.get(name) == sql for name, sql in wanted.items()):
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for name, sql in wanted.items():
                conn.execute(f"DROP TRIGGER IF EXISTS {name}")
                conn.execute(sql)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher
        self._reader.shutdown(wait=True)  # reads under way end first
        if self._conn is not None:
            await self._call(self._close)
        self._writer.shutdown(wait=True)

    def _close(self) -> None:
        assert self._conn is not None
        if self._keeper is not None and self._keeper.unsettled and self.ledger_lost() is None:
            self._settle_journal(self._conn)
        if self.ledger_lost() is not None:
            # SQLite finds the -wal and -shm files by the ledger's path, which now names
            # another file (or none): left behind, our log of transactions would be read as
            # that file's own at its next open. Checkpoint it into the file we hold open.
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.error("ledger_checkpoint_failed", ledger=str(self.path), error=str(exc))
        self._disconnect()

    def _settle_journal(self, conn: sqlite3.Connection) -> None:
        """The last commit's notes deleted and the watermark moved up, so the next open has
        nothing to write (a read-only command opens a read-only ledger)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._commit()
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("journal_settle_failed", ledger=str(self.path), error=str(exc))

    def _disconnect(self) -> None:
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        for conn in (self._rconn, self._conn):
            if conn is not None:
                conn.close()
        self._conn = self._rconn = None
        self._wtx = self._rtx = None
        self._file = None


__all__ = ["SQLiteStore", "exclusive_ledger", "migrations"]

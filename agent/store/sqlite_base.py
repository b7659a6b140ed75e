"""SQLite ledger plumbing: the connection and its worker thread, group commit, migrations,
the keys that seal card keys, the ledger's identity checks, and the row helpers the other
ledger modules share.

Only `kami-agent init` (Opening.CREATE) makes a ledger file; every other open refuses a
missing, empty, foreign or replaced ledger (agent/store/identity.py), and driver errors end
as a LedgerError that names the ledger and what is wrong with it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from agent.domain import CardItem, OrderLine
from agent.keybox import KEY_BYTES, KeyBox, unwrap, wrap
from agent.logs import get_logger
from agent.store import identity
from agent.store.base import LedgerError, StoreError
from agent.store.identity import Opening
from agent.store.rows import LINE_COLUMNS, line_from_row, migrations

T = TypeVar("T")
# A queued store call: the function, its arguments, and the future its caller awaits.
_Op = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]
log = get_logger("kami.store.sqlite")
RESEAL_BATCH = 10_000


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


class SQLiteBase:
    """Plumbing: the worker thread, group commit, migrations, the sealing keys."""

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
        self._keybox: KeyBox | None = None
        self._executor = self._new_executor()
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Op] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None
        self._conn_lock = asyncio.Lock()  # a batch, or one _call, uses the connection

    @staticmethod
    def _new_executor() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="kami-sqlite")

    # --- plumbing -------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn on the ledger thread, never while a group-commit batch holds the connection."""
        loop = asyncio.get_running_loop()
        async with self._conn_lock:
            try:
                return await loop.run_in_executor(self._executor, fn, *args)
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise LedgerError(identity.sqlite_error_text(self.path, exc)) from exc

    async def _tx(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn(conn, *args) atomically and durably, sharing the commit with other calls.

        Group commit: calls that arrive while a transaction is being written queue up and go
        into the next one together, each inside its own SAVEPOINT, so one call's failure
        rolls back only that call. A call returns only after the COMMIT that carries it, so
        "when it returns, it is durable" holds as if every call had its own transaction —
        at one fsync per batch instead of one per call.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((fn, args, future))
        if not self._flushing:
            self._flushing = True
            self._flusher = loop.create_task(self._flush())
        try:
            return await future  # type: ignore[no-any-return]
        except sqlite3.IntegrityError:
            raise  # a constraint of the ledger said no: the caller's business
        except sqlite3.Error as exc:
            raise LedgerError(identity.sqlite_error_text(self.path, exc)) from exc

    async def _flush(self) -> None:
        """One batch at a time. BEGIN IMMEDIATE (which may wait for another process's write
        lock) and COMMIT (the fsync) run on the ledger thread; the statements in between run
        right here on the event loop: they take microseconds, and running them on another
        thread would cost a GIL hand-over per statement."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                async with self._conn_lock:
                    try:
                        await loop.run_in_executor(self._executor, self._begin)
                        outcomes = self._run_batch(batch)
                        await loop.run_in_executor(self._executor, self._commit)
                    except BaseException as exc:  # no COMMIT: nothing of the batch is durable
                        self._rollback()
                        outcomes = [(False, exc)] * len(batch)
                for (_, _, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flushing = False

    def _begin(self) -> None:
        self._require().execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self._require().execute("COMMIT")

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            conn.execute("ROLLBACK")

    def _run_batch(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        conn = self._require()
        outcomes: list[tuple[bool, Any]] = []
        for fn, args, _ in batch:
            conn.execute("SAVEPOINT op")
            try:
                outcomes.append((True, fn(conn, *args)))
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                outcomes.append((False, exc))
            conn.execute("RELEASE op")
        return outcomes

    def _in_tx(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._require()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is not open")
        return self._conn

    async def open(self) -> None:
        if self._executor._shutdown:  # reopened after close()
            self._executor = self._new_executor()
        await self._call(self._open)
        self._opening = Opening.OPEN  # a created ledger is an existing one from now on

    def _open(self) -> None:
        creating = self._opening is Opening.CREATE
        made = False
        try:
            try:
                if creating:
                    made = self._create_file()
                else:
                    identity.check_ledger_file(self.path)
                self._connect(creating)
            except OSError as exc:
                raise LedgerError(identity.os_error_text(self.path, exc)) from exc
            except sqlite3.Error as exc:
                raise LedgerError(identity.sqlite_error_text(self.path, exc)) from exc
        except BaseException:
            self._disconnect()
            if made:  # a half-made ledger (ours alone) must not block the next `init`
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            raise

    def _create_file(self) -> bool:
        where = identity.identity_path(self.path)
        if self.path.exists() or where.exists():
            found = self.path if self.path.exists() else where
            raise LedgerError(
                f"{found} already exists: `kami-agent init` makes a new ledger only where"
                " there is none; nothing changed"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Card keys are money: the ledger is readable by its owner only.
        os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True

    def _connect(self, creating: bool) -> None:
        before = os.stat(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn = conn
        # The file SQLite opened: the daemon compares it with the path while it runs.
        self._file = os.stat(self.path)
        if (before.st_dev, before.st_ino) != (self._file.st_dev, self._file.st_ino):
            raise LedgerError(f"the ledger {self.path} was replaced while being opened")
        if not creating:
            self._refuse_foreign(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        # Group commit runs each call in a savepoint, whose undo copies of the pages it
        # touches would otherwise go to a temporary file: a write per page in a flash sale.
        # They are only needed until COMMIT (crash safety is the WAL's job).
        conn.execute("PRAGMA temp_store=MEMORY")
        if self._startup_checks:
            self._check_pages(conn)
        adopt = False
        if not creating:
            adopt = identity.compare(self.path, self._stored_id(conn), self._recorded_id())
        self._migrate(conn)
        self._keybox = self._in_tx(self._load_keys)
        if creating or adopt:
            self.ledger_id = self._in_tx(self._give_id)
            identity.write_identity(self.path, self.ledger_id)
            if adopt:
                log.warning("ledger_adopted", ledger=str(self.path), ledger_id=self.ledger_id)
        else:
            self.ledger_id = self._stored_id(conn)
        if self._startup_checks:
            self._in_tx(self._note_start)
        self._reseal_sku_bound(conn)

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

    def _check_pages(self, conn: sqlite3.Connection) -> None:
        """SQLite's quick_check: every page and b-tree sound (not the index contents, which
        `kami-agent check` verifies with the full integrity_check)."""
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise LedgerError(
                f"the ledger {self.path} is damaged (quick_check: {problems[0]}): restore it"
                " from backup"
            )

    @staticmethod
    def _stored_id(conn: sqlite3.Connection) -> str | None:
        try:
            row = conn.execute(
                f"SELECT value FROM {identity.META_TABLE} WHERE key = 'ledger_id'"
            ).fetchone()
        except sqlite3.OperationalError:  # no such table: a ledger made before ids existed
            return None
        return None if row is None else str(row[0])

    @staticmethod
    def _note_start(conn: sqlite3.Connection) -> None:
        conn.execute(
            f"INSERT OR REPLACE INTO {identity.META_TABLE} (key, value)"
            " VALUES ('daemon_started_at', ?)",
            (repr(time.time()),),
        )

    @staticmethod
    def _give_id(conn: sqlite3.Connection) -> str:
        ledger_id = identity.new_ledger_id()
        conn.execute(
            f"INSERT INTO {identity.META_TABLE} (key, value) VALUES ('ledger_id', ?)",
            (ledger_id,),
        )
        return ledger_id

    def _reseal_sku_bound(self, conn: sqlite3.Connection) -> None:
        """Re-seals rows sealed before rows were bound in (migration 0006), batch by batch:
        an interrupted run goes on at the next open."""

        def batch(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT id, sku, key_id, sealed FROM card_keys WHERE sku_bound_seal IS NOT NULL"
                " ORDER BY id LIMIT ?",
                (RESEAL_BATCH,),
            ).fetchall()
            for row_id, sku, key_id, sealed in rows:
                item = self.keybox.open_sku_bound(sku, key_id, sealed)
                conn.execute(
                    "UPDATE card_keys SET key_id = ?, sealed = ?, sku_bound_seal = NULL"
                    " WHERE id = ?",
                    (*self.keybox.seal(sku, item, key_id), row_id),
                )
            return len(rows)

        resealed = 0
        while count := self._in_tx(batch):
            resealed += count
        if resealed:
            log.info("card_keys_resealed", rows=resealed, bound="sku and row")

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

    def _load_keys(self, conn: sqlite3.Connection) -> KeyBox:
        rows = conn.execute(
            "SELECT id, purpose, wrapped FROM data_keys WHERE retired_at IS NULL ORDER BY id"
        ).fetchall()
        if not rows:  # a new ledger: one hash key for its lifetime, a first data key
            for purpose in ("hash", "data"):
                self._new_key(conn, purpose, time.time())
            rows = conn.execute(
                "SELECT id, purpose, wrapped FROM data_keys WHERE retired_at IS NULL ORDER BY id"
            ).fetchall()
        keys = {r[0]: unwrap(self._master_key, r[2], f"{r[1]}:{r[0]}".encode()) for r in rows}
        data = [r[0] for r in rows if r[1] == "data"]
        hash_id = next(r[0] for r in rows if r[1] == "hash")
        return KeyBox({k: keys[k] for k in data}, max(data), keys[hash_id])

    def _new_key(self, conn: sqlite3.Connection, purpose: str, now: float) -> tuple[int, bytes]:
        key = os.urandom(KEY_BYTES)
        key_id = int(
            conn.execute(
                "INSERT INTO data_keys (purpose, wrapped, created_at) VALUES (?, x'', ?)",
                (purpose, now),
            ).lastrowid
            or 0
        )
        conn.execute(
            "UPDATE data_keys SET wrapped = ? WHERE id = ?",
            (wrap(self._master_key, key, f"{purpose}:{key_id}".encode()), key_id),
        )
        return key_id, key

    @property
    def keybox(self) -> KeyBox:
        if self._keybox is None:
            raise StoreError("store is not open")
        return self._keybox

    def _key_row(self, sku: str, item: CardItem, source: str, now: float) -> tuple[Any, ...]:
        key_id, sealed = self.keybox.seal(sku, item)
        return (sku, key_id, sealed, self.keybox.digest(item), source, now)

    def _open_rows(self, rows: Sequence[tuple[Any, ...]]) -> list[CardItem]:
        """(sku, key_id, sealed, secret_hash) rows -> card keys."""
        return [self.keybox.open(r[0], r[1], r[2], r[3]) for r in rows]

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher  # calls already queued still get their commit
        if self._conn is not None:
            await self._call(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        assert self._conn is not None
        if self.ledger_lost() is not None:
            # SQLite finds the -wal and -shm files by the ledger's path, which now names
            # another file (or none): left behind, our log of transactions would be read as
            # that file's own at its next open. Checkpoint it into the file we hold open.
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.error("ledger_checkpoint_failed", ledger=str(self.path), error=str(exc))
        self._disconnect()

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._file = None

    @staticmethod
    def _event(conn: sqlite3.Connection, line_id: int, kind: str, detail: str, now: float) -> None:
        conn.execute(
            "INSERT INTO events (order_line_id, at, kind, detail) VALUES (?, ?, ?, ?)",
            (line_id, now, kind, detail),
        )

    @staticmethod
    def _refunding(conn: sqlite3.Connection, line_id: int) -> bool:
        row = conn.execute("SELECT refund_key FROM orders WHERE id = ?", (line_id,)).fetchone()
        return row is not None and row[0] is not None

    @staticmethod
    def _fetch_line(conn: sqlite3.Connection, line_id: int) -> OrderLine:
        row = conn.execute(f"SELECT {LINE_COLUMNS} FROM orders WHERE id = ?", (line_id,)).fetchone()
        if row is None:
            raise StoreError(f"no order line with id {line_id}")
        return line_from_row(row)

    async def integrity_check(self) -> str:
        def run(conn: sqlite3.Connection) -> str:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])

        return await self._call(run, self._require())

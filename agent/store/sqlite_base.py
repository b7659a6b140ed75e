"""SQLite ledger plumbing: the connection and its worker thread, group commit, migrations,
the keys that seal card keys, and the row helpers the other ledger modules share."""

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
from agent.store.base import StoreError
from agent.store.rows import LINE_COLUMNS, line_from_row, migrations

T = TypeVar("T")
# A queued store call: the function, its arguments, and the future its caller awaits.
_Op = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


@contextmanager
def exclusive_ledger(path: Path) -> Iterator[None]:
    """Held by the daemon for as long as it runs on a SQLite ledger: a second daemon on the
    same file, or migrate-store while one runs, is refused instead of racing it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
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

    def __init__(self, path: Path | str, master_key: bytes) -> None:
        self.path = Path(path)
        self._master_key = master_key
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
            return await loop.run_in_executor(self._executor, fn, *args)

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
        return await future  # type: ignore[no-any-return]

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

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Card keys are money: the ledger is readable by its owner only.
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        # Group commit runs each call in a savepoint, whose undo copies of the pages it
        # touches would otherwise go to a temporary file: a write per page in a flash sale.
        # They are only needed until COMMIT (crash safety is the WAL's job).
        conn.execute("PRAGMA temp_store=MEMORY")
        self._conn = conn
        self._migrate(conn)
        self._keybox = self._in_tx(self._load_keys)

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
        """(sku, key_id, sealed) rows -> card keys."""
        return [self.keybox.open(r[0], r[1], r[2]) for r in rows]

    async def close(self) -> None:
        if self._flusher is not None:
            await self._flusher  # calls already queued still get their commit
        if self._conn is not None:
            await self._call(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        assert self._conn is not None
        self._conn.close()
        self._conn = None

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

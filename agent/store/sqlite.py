"""SQLite implementation of the Store port.

One connection, owned by one worker thread: every call is shipped to that thread and runs as
one `BEGIN IMMEDIATE … COMMIT` transaction, so the ledger never sees interleaved writers and
a SIGKILL at any point leaves either the whole call or nothing (WAL + synchronous=FULL).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from agent.domain import (
    AlertCondition,
    AlertMessage,
    CardItem,
    DeliveryIntent,
    ImportReport,
    KeyState,
    LineState,
    OpenAlert,
    OrderEvent,
    OrderLine,
    OutboxItem,
    PlatformOrder,
    Purchase,
    PurchaseState,
    RejectedOrder,
    StockCount,
    delivery_idempotency_key,
    purchase_merchant_ref,
    refund_idempotency_key,
)
from agent.keybox import KEY_BYTES, KeyBox, unwrap, wrap
from agent.store.base import ProgressCallback, StoreError

T = TypeVar("T")
# A queued store call: the function, its arguments, and the future its caller awaits.
_Op = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]

IMPORT_BATCH = 20_000
_LINE_COLUMNS = (
    "id, platform, order_id, line, sku, quantity, state, reason, attempts, next_attempt_at,"
    " ambiguous, delivery_key, seen_at, delivered_at, buyer_contact, paid_at"
)


def _line(row: sqlite3.Row | tuple[Any, ...]) -> OrderLine:
    return OrderLine(
        id=row[0],
        platform=row[1],
        order_id=row[2],
        line=row[3],
        sku=row[4],
        quantity=row[5],
        state=LineState(row[6]),
        reason=row[7],
        attempts=row[8],
        next_attempt_at=row[9],
        ambiguous=bool(row[10]),
        delivery_key=row[11],
        seen_at=row[12],
        delivered_at=row[13],
        buyer_contact=row[14],
        paid_at=row[15],
    )


_PURCHASE_COLUMNS = (
    "id, order_line_id, supplier, sku, quantity, merchant_ref, state, purchase_id, failure,"
    " created_at, unknown_since"
)


def _purchase(row: tuple[Any, ...]) -> Purchase:
    return Purchase(
        id=row[0],
        order_line_id=row[1],
        supplier=row[2],
        sku=row[3],
        quantity=row[4],
        merchant_ref=row[5],
        state=PurchaseState(row[6]),
        purchase_id=row[7],
        failure=row[8],
        created_at=row[9],
        unknown_since=row[10],
    )


def migrations() -> list[tuple[int, str]]:
    folder = resources.files("agent.store.migrations").joinpath("sqlite")
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)


class SQLiteStore:
    def __init__(self, path: Path | str, master_key: bytes) -> None:
        self.path = Path(path)
        self._master_key = master_key
        self._keybox: KeyBox | None = None
        self._executor = self._new_executor()
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Op] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None

    @staticmethod
    def _new_executor() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="kami-sqlite")

    # --- plumbing -------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
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
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    outcomes = await loop.run_in_executor(self._executor, self._run_batch, batch)
                except BaseException as exc:  # the COMMIT itself failed: nothing is durable
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

    def _run_batch(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        conn = self._require()
        outcomes: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for fn, args, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, fn(conn, *args)))
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    outcomes.append((False, exc))
                conn.execute("RELEASE op")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
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

    async def rotate_data_key(self, now: float, batch: int = 10_000) -> tuple[int, int]:
        """Seals every card key with a fresh data key; returns (new key id, rows moved)."""

        def start(conn: sqlite3.Connection) -> int:
            key_id, key = self._new_key(conn, "data", now)
            self.keybox.add_data_key(key_id, key)
            self.keybox.current = key_id
            return key_id

        new_id = await self._tx(start)

        def move(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT id, sku, key_id, sealed FROM card_keys WHERE key_id != ? LIMIT ?",
                (new_id, batch),
            ).fetchall()
            for row_id, sku, key_id, sealed in rows:
                item = self.keybox.open(sku, key_id, sealed)
                conn.execute(
                    "UPDATE card_keys SET key_id = ?, sealed = ? WHERE id = ?",
                    (*self.keybox.seal(sku, item, new_id), row_id),
                )
            return len(rows)

        moved = 0
        while count := await self._tx(move):
            moved += count

        def retire(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE data_keys SET retired_at = ? WHERE purpose = 'data' AND id != ?"
                " AND retired_at IS NULL",
                (now, new_id),
            )

        await self._tx(retire)
        return new_id, moved

    async def export_keys(self, sku: str, state: KeyState) -> list[CardItem]:
        """Decrypted keys, for `kami-agent stock export` only."""

        def run(conn: sqlite3.Connection) -> list[CardItem]:
            rows = conn.execute(
                "SELECT sku, key_id, sealed FROM card_keys WHERE sku = ? AND state = ? ORDER BY id",
                (sku, state.value),
            ).fetchall()
            return self._open_rows(rows)

        return await self._tx(run)

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
        row = conn.execute(
            f"SELECT {_LINE_COLUMNS} FROM orders WHERE id = ?", (line_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"no order line with id {line_id}")
        return _line(row)

    # --- intake -----------------------------------------------------------------------------
    async def ingest(
        self, platform: str, orders: Sequence[PlatformOrder | RejectedOrder], now: float
    ) -> list[int]:
        if not orders:
            return []
        return await self._tx(self._ingest, platform, orders, now)

    def _ingest(
        self,
        conn: sqlite3.Connection,
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
    ) -> list[int]:
        ready: list[int] = []
        for order in orders:
            existing = conn.execute(
                "SELECT id, sku, quantity, state FROM orders"
                " WHERE platform = ? AND order_id = ? AND line = 0",
                (platform, order.order_id),
            ).fetchone()
            if existing is not None:
                self._check_duplicate(conn, existing, order, now)
                continue
            if isinstance(order, RejectedOrder):
                cur = conn.execute(
                    "INSERT INTO orders (platform, order_id, line, sku, quantity, state, reason,"
                    " seen_at, updated_at) VALUES (?, ?, 0, ?, ?, 'needs_attention', ?, ?, ?)",
                    (platform, order.order_id, order.sku, order.quantity, order.reason, now, now),
                )
                line_id = int(cur.lastrowid or 0)
                self._event(conn, line_id, "rejected", order.reason, now)
                continue
            cur = conn.execute(
                "INSERT INTO orders (platform, order_id, line, sku, quantity, state, paid_at,"
                " amount, currency, buyer_contact, deliver_by, seen_at, updated_at)"
                " VALUES (?, ?, 0, ?, ?, 'new', ?, ?, ?, ?, ?, ?, ?)",
                (
                    platform,
                    order.order_id,
                    order.sku,
                    order.quantity,
                    order.paid_at,
                    order.amount,
                    order.currency,
                    order.buyer_contact,
                    order.deliver_by,
                    now,
                    now,
                ),
            )
            line_id = int(cur.lastrowid or 0)
            self._event(conn, line_id, "intake", f"sku={order.sku} quantity={order.quantity}", now)
            ready.append(line_id)
        return ready

    def _check_duplicate(
        self,
        conn: sqlite3.Connection,
        existing: tuple[Any, ...],
        order: PlatformOrder | RejectedOrder,
        now: float,
    ) -> None:
        """The same order id seen again: harmless if identical, parked if it changed."""
        line_id, sku, quantity, state = existing
        if isinstance(order, RejectedOrder) or (order.sku, order.quantity) == (sku, quantity):
            return
        if LineState(state) in (LineState.NEW, LineState.BACKORDERED):
            reason = (
                f"platform reported order again with different content "
                f"(sku {sku!r}->{order.sku!r}, quantity {quantity}->{order.quantity})"
            )
            conn.execute(
                "UPDATE orders SET state = 'needs_attention', reason = ?, updated_at = ?"
                " WHERE id = ?",
                (reason, now, line_id),
            )
            self._event(conn, line_id, "parked", reason, now)

    async def get_cursor(self, platform: str) -> str | None:
        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT cursor FROM cursors WHERE platform = ?", (platform,)
            ).fetchone()
            return None if row is None else row[0]

        return await self._tx(run)

    async def set_cursor(self, platform: str, cursor: str | None, now: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO cursors (platform, cursor, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (platform) DO UPDATE SET cursor = excluded.cursor,"
                " updated_at = excluded.updated_at",
                (platform, cursor, now),
            )

        await self._tx(run)

    # --- state machine --------------------------------------------------------------------
    async def due_lines(self, now: float, limit: int) -> list[OrderLine]:
        def run(conn: sqlite3.Connection) -> list[OrderLine]:
            rows = conn.execute(
                f"SELECT {_LINE_COLUMNS} FROM orders"
                " WHERE (state IN ('new', 'purchasing', 'allocated', 'delivering')"
                # a backorder with a time set is waiting to be offered to suppliers again
                "        OR (state = 'backordered' AND next_attempt_at > 0))"
                " AND next_attempt_at <= ? AND refund_key IS NULL ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            due = [_line(r) for r in rows]
            taken = {line.id for line in due}
            waiting = [
                _line(r)
                for r in conn.execute(
                    f"SELECT {_LINE_COLUMNS} FROM orders WHERE state = 'backordered'"
                    " AND refund_key IS NULL ORDER BY id LIMIT ?",
                    (limit,),
                )
            ]
            if waiting:
                # Oldest first, and only lines the free stock can now fill whole, so a
                # sweep does not churn on lines that would just be backordered again.
                free = dict(
                    conn.execute(
                        "SELECT sku, COUNT(*) FROM card_keys WHERE state = 'free' GROUP BY sku"
                    ).fetchall()
                )
                for line in waiting:
                    if line.id not in taken and free.get(line.sku, 0) >= line.quantity:
                        free[line.sku] -= line.quantity
                        due.append(line)
            return due

        return await self._tx(run)

    async def get_line(self, line_id: int) -> OrderLine | None:
        def run(conn: sqlite3.Connection) -> OrderLine | None:
            row = conn.execute(
                f"SELECT {_LINE_COLUMNS} FROM orders WHERE id = ?", (line_id,)
            ).fetchone()
            return None if row is None else _line(row)

        return await self._tx(run)

    async def allocate(self, line_id: int, now: float, *, backorder: bool = True) -> OrderLine:
        return await self._tx(self._allocate, line_id, now, backorder)

    def _allocate(
        self, conn: sqlite3.Connection, line_id: int, now: float, backorder: bool = True
    ) -> OrderLine:
        line = self._fetch_line(conn, line_id)
        if line.state not in (LineState.NEW, LineState.BACKORDERED, LineState.PURCHASING):
            return line
        if self._refunding(conn, line_id):
            return line
        bound = conn.execute(
            "SELECT COUNT(*) FROM card_keys WHERE order_line_id = ?", (line_id,)
        ).fetchone()[0]
        needed = line.quantity - bound
        keys = conn.execute(
            "SELECT id, secret_hash FROM card_keys WHERE sku = ? AND state = 'free'"
            " ORDER BY id LIMIT ?",
            (line.sku, needed),
        ).fetchall()
        if len(keys) < needed:
            # All or nothing: a half-filled line would hold keys another buyer could use now.
            if backorder and line.state != LineState.BACKORDERED:
                conn.execute(
                    "UPDATE orders SET state = 'backordered', updated_at = ? WHERE id = ?",
                    (now, line_id),
                )
                self._event(conn, line_id, "backordered", f"need {needed}, free {len(keys)}", now)
            return self._fetch_line(conn, line_id)
        for slot, (key_id, _digest) in enumerate(keys, start=bound):
            conn.execute(
                "UPDATE card_keys SET state = 'bound', order_line_id = ?, slot = ?, bound_at = ?"
                " WHERE id = ? AND state = 'free'",
                (line_id, slot, now, key_id),
            )
        conn.execute(
            "UPDATE orders SET state = 'allocated', next_attempt_at = 0, updated_at = ?"
            " WHERE id = ?",
            (now, line_id),
        )
        fps = ",".join(f"#{k[0]}:{bytes(k[1]).hex()[:10]}" for k in keys)
        self._event(conn, line_id, "allocated", f"keys {fps}", now)
        # What the UPDATE above wrote, without reading the row back (hot path).
        return replace(line, state=LineState.ALLOCATED, next_attempt_at=0.0)

    async def claim_for_delivery(self, line_id: int, now: float) -> DeliveryIntent | OrderLine:
        def run(conn: sqlite3.Connection) -> DeliveryIntent | OrderLine:
            line = self._allocate(conn, line_id, now)
            if line.state != LineState.ALLOCATED:
                return line
            return self._begin_delivery(conn, line_id, now)

        return await self._tx(run)

    async def begin_delivery(self, line_id: int, now: float) -> DeliveryIntent:
        return await self._tx(self._begin_delivery, line_id, now)

    def _begin_delivery(self, conn: sqlite3.Connection, line_id: int, now: float) -> DeliveryIntent:
        line = self._fetch_line(conn, line_id)
        if line.state not in (LineState.ALLOCATED, LineState.DELIVERING):
            raise StoreError(f"order line {line_id} is {line.state}, not ready to deliver")
        keys = conn.execute(
            "SELECT id, sku, key_id, sealed FROM card_keys WHERE order_line_id = ? ORDER BY slot",
            (line_id,),
        ).fetchall()
        if len(keys) != line.quantity:
            raise StoreError(
                f"order line {line_id} holds {len(keys)} keys for quantity {line.quantity}"
            )
        generation = conn.execute(
            "SELECT delivery_generation FROM orders WHERE id = ?", (line_id,)
        ).fetchone()[0]
        key = delivery_idempotency_key(line.platform, line.order_id, line.line, generation)
        conn.execute(
            "UPDATE orders SET state = 'delivering', delivery_key = ?, attempts = attempts + 1,"
            " updated_at = ? WHERE id = ?",
            (key, now, line_id),
        )
        self._event(conn, line_id, "delivery_intent", f"attempt {line.attempts + 1} key {key}", now)
        return DeliveryIntent(
            line=replace(
                line, state=LineState.DELIVERING, delivery_key=key, attempts=line.attempts + 1
            ),
            idempotency_key=key,
            items=tuple(self._open_rows([k[1:] for k in keys])),
            key_ids=tuple(k[0] for k in keys),
        )

    async def mark_delivered(self, line_id: int, now: float, detail: str) -> OrderLine:
        def run(conn: sqlite3.Connection) -> OrderLine:
            line = self._fetch_line(conn, line_id)
            if line.state == LineState.DELIVERED:
                return line
            conn.execute(
                "UPDATE orders SET state = 'delivered', delivered_at = ?, ambiguous = 0,"
                " reason = NULL, updated_at = ? WHERE id = ?",
                (now, now, line_id),
            )
            self._event(conn, line_id, "delivered", detail, now)
            return replace(
                line, state=LineState.DELIVERED, delivered_at=now, ambiguous=False, reason=None
            )

        return await self._tx(run)

    async def defer(
        self, line_id: int, next_attempt_at: float, reason: str, *, ambiguous: bool, now: float
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE orders SET next_attempt_at = ?, reason = ?, ambiguous = ?,"
                " updated_at = ? WHERE id = ?",
                (next_attempt_at, reason, int(ambiguous), now, line_id),
            )
            self._event(conn, line_id, "retry_scheduled", reason, now)

        await self._tx(run)

    async def add_event(self, line_id: int, kind: str, detail: str, now: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            self._event(conn, line_id, kind, detail, now)

        await self._tx(run)

    async def park(self, line_id: int, reason: str, now: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE orders SET state = 'needs_attention', reason = ?, updated_at = ?"
                " WHERE id = ?",
                (reason, now, line_id),
            )
            self._event(conn, line_id, "parked", reason, now)

        await self._tx(run)

    async def close_line(self, line_id: int, state: LineState, reason: str, now: float) -> None:
        if state not in (LineState.CANCELLED, LineState.REFUNDED):
            raise StoreError(f"close_line takes cancelled or refunded, not {state}")

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE orders SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                (state.value, reason, now, line_id),
            )
            self._event(conn, line_id, str(state), reason, now)

        await self._tx(run)

    async def backorder(
        self, line_id: int, next_attempt_at: float, reason: str, now: float
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE orders SET state = 'backordered', next_attempt_at = ?, reason = ?,"
                " updated_at = ? WHERE id = ? AND state IN ('new', 'backordered', 'purchasing')",
                (next_attempt_at, reason, now, line_id),
            )
            self._event(conn, line_id, "backordered", reason, now)

        await self._tx(run)

    # --- purchases --------------------------------------------------------------------------
    async def open_purchase(self, line_id: int) -> Purchase | None:
        def run(conn: sqlite3.Connection) -> Purchase | None:
            row = conn.execute(
                f"SELECT {_PURCHASE_COLUMNS} FROM purchases WHERE order_line_id = ?"
                " AND state IN ('intent', 'unknown', 'processing')",
                (line_id,),
            ).fetchone()
            return None if row is None else _purchase(row)

        return await self._tx(run)

    async def purchases_for(self, line_id: int) -> list[Purchase]:
        def run(conn: sqlite3.Connection) -> list[Purchase]:
            rows = conn.execute(
                f"SELECT {_PURCHASE_COLUMNS} FROM purchases WHERE order_line_id = ? ORDER BY id",
                (line_id,),
            ).fetchall()
            return [_purchase(r) for r in rows]

        return await self._tx(run)

    async def begin_purchase(self, line_id: int, supplier: str, now: float) -> Purchase:
        def run(conn: sqlite3.Connection) -> Purchase:
            line = self._fetch_line(conn, line_id)
            if line.state not in (LineState.NEW, LineState.BACKORDERED, LineState.PURCHASING):
                raise StoreError(f"order line {line_id} is {line.state}, not buying")
            if self._refunding(conn, line_id):
                raise StoreError(f"order line {line_id} is being refunded, not buying")
            attempt = conn.execute(
                "SELECT COUNT(*) FROM purchases WHERE order_line_id = ? AND supplier = ?",
                (line_id, supplier),
            ).fetchone()[0]
            ref = purchase_merchant_ref(
                line.platform, line.order_id, line.line, supplier, attempt + 1
            )
            # The partial unique index refuses a second open purchase for the line.
            cur = conn.execute(
                "INSERT INTO purchases (order_line_id, supplier, sku, quantity, merchant_ref,"
                " state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'intent', ?, ?)",
                (line_id, supplier, line.sku, line.quantity, ref, now, now),
            )
            conn.execute(
                "UPDATE orders SET state = 'purchasing', updated_at = ? WHERE id = ?",
                (now, line_id),
            )
            self._event(conn, line_id, "purchase_intent", f"{supplier} ref {ref}", now)
            return self._fetch_purchase(conn, int(cur.lastrowid or 0))

        return await self._tx(run)

    async def purchase_unknown(self, purchase: Purchase, reason: str, now: float) -> Purchase:
        def run(conn: sqlite3.Connection) -> Purchase:
            conn.execute(
                "UPDATE purchases SET state = 'unknown', unknown_since = COALESCE(unknown_since,"
                " ?), failure = ?, updated_at = ? WHERE id = ? AND state IN ('intent', 'unknown')",
                (now, reason, now, purchase.id),
            )
            self._event(
                conn,
                purchase.order_line_id,
                "purchase_unknown",
                f"{purchase.merchant_ref}: {reason}",
                now,
            )
            return self._fetch_purchase(conn, purchase.id)

        return await self._tx(run)

    async def purchase_processing(self, purchase: Purchase, purchase_id: str, now: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE purchases SET state = 'processing', purchase_id = ?, updated_at = ?"
                " WHERE id = ? AND state IN ('intent', 'unknown', 'processing')",
                (purchase_id, now, purchase.id),
            )
            self._event(
                conn,
                purchase.order_line_id,
                "purchase_processing",
                f"{purchase.supplier} purchase {purchase_id}",
                now,
            )

        await self._tx(run)

    async def purchase_failed(self, purchase: Purchase, failure: str, now: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE purchases SET state = 'failed', failure = ?, updated_at = ?"
                " WHERE id = ? AND state IN ('intent', 'unknown', 'processing')",
                (failure, now, purchase.id),
            )
            self._event(
                conn,
                purchase.order_line_id,
                "purchase_failed",
                f"{purchase.supplier} {purchase.merchant_ref}: {failure}",
                now,
            )

        await self._tx(run)

    async def complete_purchase(
        self, purchase: Purchase, purchase_id: str, items: Sequence[CardItem], now: float
    ) -> OrderLine:
        """Stores the bought keys and binds them to the line in one transaction."""

        def run(conn: sqlite3.Connection) -> OrderLine:
            current = self._fetch_purchase(conn, purchase.id)
            line = self._fetch_line(conn, purchase.order_line_id)
            if current.state == PurchaseState.COMPLETED:
                return line
            source = f"purchase:{purchase.supplier}:{purchase.merchant_ref}"
            new_ids: list[int] = []
            for item in items:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO card_keys (sku, key_id, sealed, secret_hash, state,"
                    " source, added_at) VALUES (?, ?, ?, ?, 'free', ?, ?)",
                    self._key_row(line.sku, item, source, now),
                )
                if cur.rowcount:
                    new_ids.append(int(cur.lastrowid or 0))
            conn.execute(
                "UPDATE purchases SET state = 'completed', purchase_id = ?, failure = NULL,"
                " updated_at = ? WHERE id = ?",
                (purchase_id, now, purchase.id),
            )
            self._event(
                conn,
                line.id,
                "purchase_completed",
                f"{purchase.supplier} {purchase.merchant_ref}: {len(new_ids)} new keys",
                now,
            )
            return self._bind_first(conn, line, new_ids, now)

        return await self._tx(run)

    def _bind_first(
        self, conn: sqlite3.Connection, line: OrderLine, preferred: list[int], now: float
    ) -> OrderLine:
        """Binds the just-bought keys to the line (extras stay free), else the oldest free."""
        if line.state not in (LineState.NEW, LineState.BACKORDERED, LineState.PURCHASING):
            return line
        needed = line.quantity
        free_preferred = (
            [
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM card_keys WHERE state = 'free' AND id IN"
                    f" ({','.join('?' * len(preferred))}) ORDER BY id",
                    preferred,
                )
            ]
            if preferred
            else []
        )
        chosen = free_preferred[:needed]
        if len(chosen) < needed:
            chosen += [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM card_keys WHERE sku = ? AND state = 'free' ORDER BY id LIMIT ?",
                    (line.sku, needed + len(chosen)),
                )
                if r[0] not in chosen
            ][: needed - len(chosen)]
        if len(chosen) < needed:
            conn.execute(
                "UPDATE orders SET state = 'backordered', next_attempt_at = 0, updated_at = ?"
                " WHERE id = ?",
                (now, line.id),
            )
            self._event(conn, line.id, "backordered", f"bought too few keys; need {needed}", now)
            return self._fetch_line(conn, line.id)
        for slot, key_id in enumerate(chosen):
            conn.execute(
                "UPDATE card_keys SET state = 'bound', order_line_id = ?, slot = ?, bound_at = ?"
                " WHERE id = ? AND state = 'free'",
                (line.id, slot, now, key_id),
            )
        conn.execute(
            "UPDATE orders SET state = 'allocated', next_attempt_at = 0, updated_at = ?"
            " WHERE id = ?",
            (now, line.id),
        )
        self._event(conn, line.id, "allocated", f"keys {','.join(f'#{k}' for k in chosen)}", now)
        return self._fetch_line(conn, line.id)

    @staticmethod
    def _fetch_purchase(conn: sqlite3.Connection, row_id: int) -> Purchase:
        row = conn.execute(
            f"SELECT {_PURCHASE_COLUMNS} FROM purchases WHERE id = ?", (row_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"no purchase with id {row_id}")
        return _purchase(row)

    # --- forecast, alerts, outbox ---------------------------------------------------------------
    async def demand_since(self, since: float) -> list[tuple[str, float, int]]:
        def run(conn: sqlite3.Connection) -> list[tuple[str, float, int]]:
            rows = conn.execute(
                "SELECT sku, seen_at, quantity FROM orders WHERE seen_at >= ?"
                " AND state NOT IN ('needs_attention', 'cancelled')",
                (since,),
            ).fetchall()
            return [(r[0], r[1], r[2]) for r in rows]

        return await self._tx(run)

    async def active_lines(self, limit: int) -> list[OrderLine]:
        def run(conn: sqlite3.Connection) -> list[OrderLine]:
            rows = conn.execute(
                f"SELECT {_LINE_COLUMNS} FROM orders WHERE state IN ('new', 'backordered',"
                " 'purchasing', 'allocated', 'delivering') ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
            return [_line(r) for r in rows]

        return await self._tx(run)

    async def apply_alerts(
        self,
        active: Sequence[AlertCondition],
        channels: Sequence[str],
        now: float,
        escalate_after: float,
        max_escalations: int,
    ) -> list[AlertMessage]:
        """Opens, escalates and resolves alerts and queues their messages, in one transaction."""

        def run(conn: sqlite3.Connection) -> list[AlertMessage]:
            messages: list[AlertMessage] = []
            current = {c.key: c for c in active}
            rows = conn.execute(
                "SELECT key, kind, severity, summary, last_sent_at, escalations FROM alerts"
                " WHERE state = 'open'"
            ).fetchall()
            open_now = {r[0]: r for r in rows}
            for cond in active:
                row = open_now.get(cond.key)
                if row is None:
                    conn.execute(
                        "INSERT INTO alerts (key, kind, state, severity, summary, opened_at,"
                        " last_sent_at, escalations) VALUES (?, ?, 'open', ?, ?, ?, ?, 0)"
                        " ON CONFLICT (key) DO UPDATE SET state = 'open', severity ="
                        " excluded.severity, summary = excluded.summary, opened_at = excluded"
                        ".opened_at, last_sent_at = excluded.last_sent_at, escalations = 0,"
                        " resolved_at = NULL",
                        (cond.key, cond.kind, cond.severity, cond.summary, now, now),
                    )
                    messages.append(
                        AlertMessage(
                            cond.key, cond.kind, "opened", cond.severity, cond.summary, now
                        )
                    )
                elif now - row[4] >= escalate_after and row[5] < max_escalations:
                    conn.execute(
                        "UPDATE alerts SET last_sent_at = ?, escalations = escalations + 1,"
                        " summary = ? WHERE key = ?",
                        (now, cond.summary, cond.key),
                    )
                    messages.append(
                        AlertMessage(
                            cond.key, cond.kind, "escalated", cond.severity, cond.summary, now
                        )
                    )
                else:
                    conn.execute(
                        "UPDATE alerts SET summary = ? WHERE key = ?", (cond.summary, cond.key)
                    )
            for key, row in open_now.items():
                if key not in current:
                    conn.execute(
                        "UPDATE alerts SET state = 'resolved', resolved_at = ? WHERE key = ?",
                        (now, key),
                    )
                    messages.append(
                        AlertMessage(key, row[1], "resolved", row[2], f"resolved: {row[3]}", now)
                    )
            for message in messages:
                for channel in channels:
                    conn.execute(
                        "INSERT INTO outbox (channel, alert_key, payload, created_at)"
                        " VALUES (?, ?, ?, ?)",
                        (channel, message.key, message.to_json(), now),
                    )
            return messages

        return await self._tx(run)

    async def open_alerts(self) -> list[OpenAlert]:
        def run(conn: sqlite3.Connection) -> list[OpenAlert]:
            rows = conn.execute(
                "SELECT key, kind, severity, summary, opened_at, escalations FROM alerts"
                " WHERE state = 'open' ORDER BY opened_at"
            ).fetchall()
            return [OpenAlert(*r) for r in rows]

        return await self._tx(run)

    async def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        def run(conn: sqlite3.Connection) -> list[OutboxItem]:
            rows = conn.execute(
                "SELECT id, channel, payload, attempts FROM outbox WHERE sent_at IS NULL"
                " AND dead_at IS NULL AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            return [OutboxItem(*r) for r in rows]

        return await self._tx(run)

    async def outbox_done(
        self, item_id: int, now: float, *, error: str | None = None, retry_at: float | None = None
    ) -> None:
        """Sent (no error), to retry at `retry_at`, or dead (error and no retry)."""

        def run(conn: sqlite3.Connection) -> None:
            if error is None:
                conn.execute(
                    "UPDATE outbox SET sent_at = ?, attempts = attempts + 1 WHERE id = ?",
                    (now, item_id),
                )
            elif retry_at is not None:
                conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?,"
                    " last_error = ? WHERE id = ?",
                    (retry_at, error, item_id),
                )
            else:
                conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1, dead_at = ?, last_error = ?"
                    " WHERE id = ?",
                    (now, error, item_id),
                )

        await self._tx(run)

    # --- buyer side -------------------------------------------------------------------------
    async def lines_needing_notice(self, seen_before: float, limit: int) -> list[OrderLine]:
        def run(conn: sqlite3.Connection) -> list[OrderLine]:
            rows = conn.execute(
                f"SELECT {_LINE_COLUMNS} FROM orders WHERE state IN ('backordered', 'purchasing')"
                " AND notice_sent_at IS NULL AND seen_at <= ? ORDER BY id LIMIT ?",
                (seen_before, limit),
            ).fetchall()
            return [_line(r) for r in rows]

        return await self._tx(run)

    async def mark_notice_sent(self, line_id: int, message: str, now: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE orders SET notice_sent_at = ? WHERE id = ?", (now, line_id))
            self._event(conn, line_id, "buyer_notice", message[:200], now)

        await self._tx(run)

    async def begin_refund(self, line_id: int, now: float) -> str | None:
        """Commits the refund intent if the line still has no keys and nothing being bought."""

        def run(conn: sqlite3.Connection) -> str | None:
            line = self._fetch_line(conn, line_id)
            row = conn.execute("SELECT refund_key FROM orders WHERE id = ?", (line_id,))
            existing = row.fetchone()[0]
            if existing:
                return str(existing)
            busy = conn.execute(
                "SELECT (SELECT COUNT(*) FROM card_keys WHERE order_line_id = ?) +"
                " (SELECT COUNT(*) FROM purchases WHERE order_line_id = ?"
                "  AND state IN ('intent', 'unknown', 'processing'))",
                (line_id, line_id),
            ).fetchone()[0]
            if line.state != LineState.BACKORDERED or busy:
                return None
            key = refund_idempotency_key(line.platform, line.order_id, line.line)
            conn.execute(
                "UPDATE orders SET refund_key = ?, updated_at = ? WHERE id = ?", (key, now, line_id)
            )
            self._event(conn, line_id, "refund_intent", f"key {key}", now)
            return key

        return await self._tx(run)

    async def refunds_in_flight(self) -> list[tuple[OrderLine, str]]:
        def run(conn: sqlite3.Connection) -> list[tuple[OrderLine, str]]:
            rows = conn.execute(
                f"SELECT {_LINE_COLUMNS}, refund_key FROM orders WHERE refund_key IS NOT NULL"
                " AND state = 'backordered'"
            ).fetchall()
            return [(_line(r[:16]), r[16]) for r in rows]

        return await self._tx(run)

    # --- operator actions -----------------------------------------------------------------
    async def retry_line(self, line_id: int, now: float) -> OrderLine:
        def run(conn: sqlite3.Connection) -> OrderLine:
            line = self._fetch_line(conn, line_id)
            if line.state != LineState.NEEDS_ATTENTION:
                raise StoreError(
                    f"order {line.order_id} is {line.state}; only needs_attention can be retried"
                )
            bound = conn.execute(
                "SELECT COUNT(*) FROM card_keys WHERE order_line_id = ?", (line_id,)
            ).fetchone()[0]
            open_purchase = conn.execute(
                "SELECT 1 FROM purchases WHERE order_line_id = ?"
                " AND state IN ('intent', 'unknown', 'processing')",
                (line_id,),
            ).fetchone()
            if line.delivery_key is not None:
                # It may have reached the platform: ask before sending again.
                state, ambiguous = LineState.DELIVERING, 1
            elif open_purchase and not bound:
                # Ask the supplier about the open purchase again; never buy blind.
                state, ambiguous = LineState.PURCHASING, 0
            elif bound:
                state, ambiguous = LineState.ALLOCATED, 0
            else:
                state, ambiguous = LineState.NEW, 0
            conn.execute(
                "UPDATE orders SET state = ?, reason = NULL, attempts = 0, next_attempt_at = 0,"
                " ambiguous = ?, updated_at = ? WHERE id = ?",
                (state.value, ambiguous, now, line_id),
            )
            self._event(conn, line_id, "operator_retry", f"back to {state}", now)
            return self._fetch_line(conn, line_id)

        return await self._tx(run)

    async def resend_line(self, line_id: int, now: float) -> OrderLine:
        def run(conn: sqlite3.Connection) -> OrderLine:
            line = self._fetch_line(conn, line_id)
            if line.state != LineState.DELIVERED:
                raise StoreError(
                    f"order {line.order_id} is {line.state}; only delivered orders can be resent"
                )
            # A new generation gives a new idempotency key, so the platform sends it again
            # (same keys: resend never hands out a second set).
            conn.execute(
                "UPDATE orders SET state = 'delivering', delivery_generation ="
                " delivery_generation + 1, attempts = 0, next_attempt_at = 0, ambiguous = 0,"
                " updated_at = ? WHERE id = ?",
                (now, line_id),
            )
            self._event(conn, line_id, "operator_resend", "same keys, new delivery", now)
            return self._fetch_line(conn, line_id)

        return await self._tx(run)

    async def find_lines(self, order_ref: str) -> list[OrderLine]:
        def run(conn: sqlite3.Connection) -> list[OrderLine]:
            rows = conn.execute(
                f"SELECT {_LINE_COLUMNS} FROM orders WHERE order_id = ? ORDER BY id", (order_ref,)
            ).fetchall()
            if not rows and order_ref.isdigit():
                rows = conn.execute(
                    f"SELECT {_LINE_COLUMNS} FROM orders WHERE id = ?", (int(order_ref),)
                ).fetchall()
            return [_line(r) for r in rows]

        return await self._tx(run)

    async def list_lines(self, state: LineState | None, limit: int) -> list[OrderLine]:
        def run(conn: sqlite3.Connection) -> list[OrderLine]:
            if state is None:
                rows = conn.execute(
                    f"SELECT {_LINE_COLUMNS} FROM orders ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_LINE_COLUMNS} FROM orders WHERE state = ? ORDER BY id DESC LIMIT ?",
                    (state.value, limit),
                ).fetchall()
            return [_line(r) for r in rows]

        return await self._tx(run)

    async def events(self, line_id: int) -> list[OrderEvent]:
        def run(conn: sqlite3.Connection) -> list[OrderEvent]:
            rows = conn.execute(
                "SELECT at, kind, detail FROM events WHERE order_line_id = ? ORDER BY id",
                (line_id,),
            ).fetchall()
            return [OrderEvent(at=r[0], kind=r[1], detail=r[2]) for r in rows]

        return await self._tx(run)

    async def count_by_state(self) -> dict[LineState, int]:
        def run(conn: sqlite3.Connection) -> dict[LineState, int]:
            rows = conn.execute("SELECT state, COUNT(*) FROM orders GROUP BY state").fetchall()
            return {LineState(r[0]): r[1] for r in rows}

        return await self._tx(run)

    # --- stock ------------------------------------------------------------------------------
    async def import_keys(
        self,
        sku: str,
        items: Iterable[CardItem],
        source: str,
        now: float,
        progress: ProgressCallback | None = None,
    ) -> ImportReport:
        return await self._call(self._import_keys, sku, items, source, now, progress)

    def _import_keys(
        self,
        sku: str,
        items: Iterable[CardItem],
        source: str,
        now: float,
        progress: ProgressCallback | None,
    ) -> ImportReport:
        # Batches of their own transactions keep the daemon's writes flowing during a big
        # import; an interrupted import is simply run again (duplicates are skipped).
        added = seen = 0
        iterator = iter(items)
        while batch := list(itertools.islice(iterator, IMPORT_BATCH)):
            rows = [self._key_row(sku, item, source, now) for item in batch]

            def insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]] = rows) -> int:
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO card_keys (sku, key_id, sealed, secret_hash, state,"
                    " source, added_at) VALUES (?, ?, ?, ?, 'free', ?, ?)",
                    rows,
                )
                return conn.total_changes - before

            added += self._in_tx(insert)
            seen += len(batch)
            if progress is not None:
                progress(seen)
        return ImportReport(added=added, duplicates=seen - added)

    async def void_free_keys(self, sku: str, count: int | None, reason: str, now: float) -> int:
        if not reason.strip():
            raise StoreError("a reason is required to void keys")

        def run(conn: sqlite3.Connection) -> int:
            limit = -1 if count is None else count
            cur = conn.execute(
                "UPDATE card_keys SET state = 'void', void_reason = ? WHERE id IN"
                " (SELECT id FROM card_keys WHERE sku = ? AND state = 'free' ORDER BY id LIMIT ?)",
                (reason, sku, limit),
            )
            return cur.rowcount

        return await self._tx(run)

    async def stock_counts(self) -> list[StockCount]:
        def run(conn: sqlite3.Connection) -> list[StockCount]:
            rows = conn.execute(
                "SELECT sku, SUM(state = 'free'), SUM(state = 'bound'), SUM(state = 'void')"
                " FROM card_keys GROUP BY sku ORDER BY sku"
            ).fetchall()
            return [StockCount(sku=r[0], free=r[1], bound=r[2], void=r[3]) for r in rows]

        return await self._tx(run)

    async def bound_items(self, line_id: int) -> tuple[CardItem, ...]:
        def run(conn: sqlite3.Connection) -> tuple[CardItem, ...]:
            rows = conn.execute(
                "SELECT sku, key_id, sealed FROM card_keys WHERE order_line_id = ? ORDER BY slot",
                (line_id,),
            ).fetchall()
            return tuple(self._open_rows(rows))

        return await self._tx(run)

    async def integrity_check(self) -> str:
        def run(conn: sqlite3.Connection) -> str:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])

        return await self._call(run, self._require())


__all__ = ["KeyState", "SQLiteStore"]

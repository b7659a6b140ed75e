"""SQLite ledger: order intake, the order state machine and operator actions."""

from __future__ import annotations

import sqlite3
from collections import Counter, deque
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from agent.domain import (
    DeliveryIntent,
    LineState,
    OrderEvent,
    OrderLine,
    PlatformOrder,
    RejectedOrder,
    delivery_idempotency_key,
)
from agent.keybox import SealedKeyError, StoreKeyError
from agent.store.base import StoreError
from agent.store.rows import (
    LINE_COLUMNS,
    FreeKeys,
    allocated_detail,
    changed_order_reason,
    claimed_at_intake,
    intake_delivery_key,
    line_from_row,
    new_line,
    retry_target,
    take_keys,
)
from agent.store.set_aside import data_error, take_in_one_by_one
from agent.store.sqlite_base import SQLiteBase

# What sqlite3 raises for a value it cannot take: text with no UTF-8 (a lone surrogate), an
# integer past 64 bits.
DATA_ERRORS = (UnicodeError, OverflowError, sqlite3.DataError)
# A new line as intake writes it: (line id, its delivery intent if it was claimed as it was
# inserted, the order it came from).
_Inserted = tuple[int, DeliveryIntent | None, PlatformOrder]


class OrdersLedger(SQLiteBase):
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
        inserted, _ = self._insert_orders(conn, platform, orders, now, ())
        return [line_id for line_id, _, _ in inserted]

    async def take_in(
        self,
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
    ) -> list[DeliveryIntent | OrderLine]:
        if not orders:
            return []
        try:
            return await self._tx(self._take_in, platform, orders, now, local_skus)
        except Exception as exc:
            if data_error(exc, DATA_ERRORS) is None:
                raise
        # A value of one order the ledger cannot take (agent/store/set_aside.py).
        return await take_in_one_by_one(
            platform,
            orders,
            lambda one: self._tx(self._take_in, platform, one, now, local_skus),
            DATA_ERRORS,
        )

    def _take_in(
        self,
        conn: sqlite3.Connection,
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
    ) -> list[DeliveryIntent | OrderLine]:
        """ingest, and claim_for_delivery of each new local-stock line, in one transaction.
        The common case is written once: such a line is inserted already `delivering`, its
        keys bound, rather than inserted `new` and then updated (a flash sale is mostly
        this)."""
        inserted, keys_open = self._insert_orders(conn, platform, orders, now, local_skus)
        taken: list[DeliveryIntent | OrderLine] = []
        for line_id, intent, order in inserted:
            if intent is not None:
                taken.append(intent)
            elif keys_open and order.sku in local_skus:
                # Too few keys when it was inserted: the general path backorders it.
                taken.append(self._claim_one(conn, line_id, now))
            else:
                taken.append(new_line(line_id, platform, order, now))
        return taken

    def _insert_orders(
        self,
        conn: sqlite3.Connection,
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
    ) -> tuple[list[_Inserted], bool]:
        """Inserts the orders not in the ledger yet (parks changed duplicates and rejected
        orders), claiming the keys of new `local_skus` lines as they are inserted. Returns the
        new lines that are ready, in order, and whether the free keys opened (else nothing
        was claimed)."""
        # The page's orders already in the ledger, in one query per 500 (not one per order).
        known: dict[str, tuple[Any, ...]] = {}
        order_ids = [o.order_id for o in orders]
        for start in range(0, len(order_ids), 500):
            chunk = order_ids[start : start + 500]
            known.update(
                (row[0], row[1:])
                for row in conn.execute(
                    f"SELECT order_id, id, sku, quantity, state FROM orders WHERE platform = ?"
                    f" AND line = 0 AND order_id IN ({','.join('?' * len(chunk))})",
                    (platform, *chunk),
                )
            )
        free = self._free_keys_for(conn, orders, known, local_skus)
        keys_open = free is not None
        ready: list[_Inserted] = []
        events: list[tuple[int, float, str, str]] = []
        binds: list[tuple[int, int, float, int]] = []
        for order in orders:
            existing = known.get(order.order_id)
            if existing is not None:
                known[order.order_id] = self._check_duplicate(conn, existing, order, now, events)
                continue
            if isinstance(order, RejectedOrder):
                cur = conn.execute(
                    "INSERT INTO orders (platform, order_id, line, sku, quantity, state, reason,"
                    " seen_at, updated_at) VALUES (?, ?, 0, ?, ?, 'needs_attention', ?, ?, ?)",
                    (platform, order.order_id, order.sku, order.quantity, order.reason, now, now),
                )
                line_id = int(cur.lastrowid or 0)
                known[order.order_id] = (line_id, order.sku, order.quantity, "needs_attention")
                events.append((line_id, now, "rejected", order.reason))
                continue
            keys = take_keys(free, order.sku, order.quantity) if free else None
            key = None if keys is None else intake_delivery_key(platform, order, keys)
            state = LineState.NEW if keys is None else LineState.DELIVERING
            cur = conn.execute(
                "INSERT INTO orders (platform, order_id, line, sku, quantity, state, paid_at,"
                " amount, currency, buyer_contact, deliver_by, seen_at, updated_at,"
                " delivery_key, attempts) VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    platform,
                    order.order_id,
                    order.sku,
                    order.quantity,
                    state,
                    order.paid_at,
                    order.amount,
                    order.currency,
                    order.buyer_contact,
                    order.deliver_by,
                    now,
                    now,
                    key,
                    0 if keys is None else 1,
                ),
            )
            line_id = int(cur.lastrowid or 0)
            known[order.order_id] = (line_id, order.sku, order.quantity, state)
            events.append((line_id, now, "intake", f"sku={order.sku} quantity={order.quantity}"))
            if keys is None or key is None:
                ready.append((line_id, None, order))
                continue
            intent = claimed_at_intake(line_id, platform, order, now, keys, key)
            binds += [(line_id, slot, now, k[0]) for slot, k in enumerate(keys)]
            events.append((line_id, now, "allocated", allocated_detail((k[0], k[1]) for k in keys)))
            events.append((line_id, now, "delivery_intent", f"attempt 1 key {key}"))
            ready.append((line_id, intent, order))
        conn.executemany(
            "UPDATE card_keys SET state = 'bound', order_line_id = ?, slot = ?, bound_at = ?"
            " WHERE id = ? AND state = 'free'",
            binds,
        )
        conn.executemany(
            "INSERT INTO events (order_line_id, at, kind, detail) VALUES (?, ?, ?, ?)", events
        )
        return ready, keys_open

    def _free_keys_for(
        self,
        conn: sqlite3.Connection,
        orders: Sequence[PlatformOrder | RejectedOrder],
        known: dict[str, tuple[Any, ...]],
        local_skus: Collection[str],
    ) -> FreeKeys | None:
        """Enough free keys, opened, for the orders of `local_skus` about to be inserted.
        None if one does not open (a damaged ledger): the lines are then inserted `new`, and
        the worker that takes each one up reports the broken key."""
        wanted = Counter[str]()
        for order in orders:
            if (
                isinstance(order, PlatformOrder)
                and order.sku in local_skus
                and order.order_id not in known
            ):
                wanted[order.sku] += order.quantity
        free: FreeKeys = {}
        try:
            for sku, count in wanted.items():
                rows = conn.execute(
                    "SELECT id, secret_hash, key_id, sealed FROM card_keys"
                    " WHERE sku = ? AND state = 'free' ORDER BY id LIMIT ?",
                    (sku, count),
                ).fetchall()
                free[sku] = deque(
                    (r[0], r[1], self.keybox.open(sku, r[2], r[3], r[1])) for r in rows
                )
        except StoreKeyError:
            return None
        return free

    def _check_duplicate(
        self,
        conn: sqlite3.Connection,
        existing: tuple[Any, ...],
        order: PlatformOrder | RejectedOrder,
        now: float,
        events: list[tuple[int, float, str, str]],
    ) -> tuple[Any, ...]:
        """The same order id seen again: harmless if identical, parked if it changed (its
        event joins the page's `events`, in order). Returns the row as it now stands."""
        line_id, sku, quantity, state = existing
        if isinstance(order, RejectedOrder):
            return existing
        reason = changed_order_reason(sku, quantity, LineState(state), order)
        if reason is None:
            return existing
        conn.execute(
            "UPDATE orders SET state = 'needs_attention', reason = ?, updated_at = ? WHERE id = ?",
            (reason, now, line_id),
        )
        events.append((line_id, now, "parked", reason))
        return (line_id, sku, quantity, "needs_attention")

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
                f"SELECT {LINE_COLUMNS} FROM orders"
                " WHERE (state IN ('new', 'purchasing', 'allocated', 'delivering')"
                # a backorder with a time set is waiting to be offered to suppliers again
                "        OR (state = 'backordered' AND next_attempt_at > 0))"
                " AND next_attempt_at <= ? AND refund_key IS NULL ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            due = [line_from_row(r) for r in rows]
            taken = {line.id for line in due}
            waiting = [
                line_from_row(r)
                for r in conn.execute(
                    f"SELECT {LINE_COLUMNS} FROM orders WHERE state = 'backordered'"
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
                f"SELECT {LINE_COLUMNS} FROM orders WHERE id = ?", (line_id,)
            ).fetchone()
            return None if row is None else line_from_row(row)

        return await self._tx(run)

    async def take_line(self, line_id: int, now: float) -> OrderLine | None:
        # One agent per SQLite ledger: every line is ours.
        return await self.get_line(line_id)

    @asynccontextmanager
    async def singleton(self, name: str) -> AsyncIterator[bool]:
        yield True

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
        self._event(conn, line_id, "allocated", allocated_detail((k[0], k[1]) for k in keys), now)
        # What the UPDATE above wrote, without reading the row back (hot path).
        return replace(line, state=LineState.ALLOCATED, next_attempt_at=0.0)

    async def claim_for_delivery(self, line_id: int, now: float) -> DeliveryIntent | OrderLine:
        return await self._tx(self._claim_one, line_id, now)

    def _claim_one(
        self, conn: sqlite3.Connection, line_id: int, now: float
    ) -> DeliveryIntent | OrderLine:
        """claim_for_delivery: a line in any state, or one short of keys."""
        line = self._allocate(conn, line_id, now)
        if line.state != LineState.ALLOCATED:
            return line
        try:
            return self._begin_delivery(conn, line_id, now)
        except SealedKeyError:
            # Left allocated, its keys bound (so no other line takes the bad one): the
            # worker that takes it up parks it with the reason (begin_delivery refuses).
            return line

    async def begin_delivery(self, line_id: int, now: float) -> DeliveryIntent:
        return await self._tx(self._begin_delivery, line_id, now)

    def _begin_delivery(self, conn: sqlite3.Connection, line_id: int, now: float) -> DeliveryIntent:
        line = self._fetch_line(conn, line_id)
        if line.state not in (LineState.ALLOCATED, LineState.DELIVERING):
            raise StoreError(f"order line {line_id} is {line.state}, not ready to deliver")
        keys = conn.execute(
            "SELECT id, sku, key_id, sealed, secret_hash FROM card_keys WHERE order_line_id = ?"
            " ORDER BY slot",
            (line_id,),
        ).fetchall()
        if len(keys) != line.quantity:
            raise StoreError(
                f"order line {line_id} holds {len(keys)} keys for quantity {line.quantity}"
            )
        items = tuple(self._open_rows([k[1:] for k in keys]))  # before any write: may refuse
        generation = conn.execute(
            "SELECT delivery_generation FROM orders WHERE id = ?", (line_id,)
        ).fetchone()[0]
        key = delivery_idempotency_key(
            line.platform, line.order_id, line.line, generation, (k[4] for k in keys)
        )
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
            items=items,
            key_ids=tuple(k[0] for k in keys),
        )

    async def mark_delivered(self, line_id: int, now: float, detail: str) -> OrderLine:
        def run(conn: sqlite3.Connection) -> OrderLine:
            row = conn.execute(
                f"UPDATE orders SET state = 'delivered', delivered_at = ?, ambiguous = 0,"
                f" reason = NULL, updated_at = ? WHERE id = ? AND state != 'delivered'"
                f" RETURNING {LINE_COLUMNS}",
                (now, now, line_id),
            ).fetchone()
            if row is None:  # delivered already (or no such line: _fetch_line says so)
                return self._fetch_line(conn, line_id)
            self._event(conn, line_id, "delivered", detail, now)
            return line_from_row(row)

        return await self._tx(run)

    async def mark_many_delivered(self, deliveries: Sequence[tuple[int, str]], now: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            details = dict(deliveries)
            marks = ",".join("?" * len(details))
            changed = conn.execute(
                f"UPDATE orders SET state = 'delivered', delivered_at = ?, ambiguous = 0,"
                f" reason = NULL, updated_at = ? WHERE id IN ({marks}) AND state != 'delivered'"
                f" RETURNING id",
                (now, now, *details),
            ).fetchall()
            conn.executemany(
                "INSERT INTO events (order_line_id, at, kind, detail)"
                " VALUES (?, ?, 'delivered', ?)",
                [(row[0], now, details[row[0]]) for row in changed],
            )

        if deliveries:
            await self._tx(run)

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
            state, ambiguous = retry_target(line, bound, open_purchase is not None)
            conn.execute(
                "UPDATE orders SET state = ?, reason = NULL, attempts = 0, next_attempt_at = 0,"
                " ambiguous = ?, updated_at = ? WHERE id = ?",
                (state.value, int(ambiguous), now, line_id),
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
                f"SELECT {LINE_COLUMNS} FROM orders WHERE order_id = ? ORDER BY id", (order_ref,)
            ).fetchall()
            if not rows and order_ref.isdigit():
                rows = conn.execute(
                    f"SELECT {LINE_COLUMNS} FROM orders WHERE id = ?", (int(order_ref),)
                ).fetchall()
            return [line_from_row(r) for r in rows]

        return await self._tx(run)

    async def delivered_lines_of(self, platform: str, order_ids: Sequence[str]) -> list[OrderLine]:
        def run(conn: sqlite3.Connection) -> list[OrderLine]:
            found: list[OrderLine] = []
            for start in range(0, len(order_ids), 500):  # SQLite caps bound parameters
                chunk = order_ids[start : start + 500]
                rows = conn.execute(
                    f"SELECT {LINE_COLUMNS} FROM orders WHERE platform = ? AND state = 'delivered'"
                    f" AND order_id IN ({','.join('?' * len(chunk))})",
                    (platform, *chunk),
                ).fetchall()
                found.extend(line_from_row(r) for r in rows)
            return found

        return await self._tx(run)

    async def list_lines(self, state: LineState | None, limit: int) -> list[OrderLine]:
        def run(conn: sqlite3.Connection) -> list[OrderLine]:
            if state is None:
                rows = conn.execute(
                    f"SELECT {LINE_COLUMNS} FROM orders ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {LINE_COLUMNS} FROM orders WHERE state = ? ORDER BY id DESC LIMIT ?",
                    (state.value, limit),
                ).fetchall()
            return [line_from_row(r) for r in rows]

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

"""PostgreSQL ledger: order intake, claiming lines across agents, the order state machine and
operator actions. The same transitions as sqlite_orders.py; what differs is how agents share:
row locks, SKIP LOCKED and leases."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Collection, Sequence
from dataclasses import replace

import asyncpg

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
from agent.store.postgres_base import Conn, PostgresBase
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

# What asyncpg raises for a value the database cannot take: text with no UTF-8 (a lone
# surrogate, refused by the driver), NUL (refused by the server), a number out of range.
DATA_ERRORS = (asyncpg.DataError, UnicodeError, OverflowError)
# A line another agent holds a live lease on is left alone.
_LEASE_FREE = "(lease_until IS NULL OR lease_until <= $1 OR claimed_by = $2)"


class PgOrdersLedger(PostgresBase):
    async def ingest(
        self, platform: str, orders: Sequence[PlatformOrder | RejectedOrder], now: float
    ) -> list[int]:
        if not orders:
            return []
        # One order of inserts for every agent, so two agents taking in the same page wait
        # for each other instead of deadlocking.
        ordered = sorted(orders, key=lambda o: o.order_id)
        inserted = await self._tx(self._ingest, platform, ordered, now)
        return [line_id for line_id, _ in inserted]

    async def _ingest(
        self,
        conn: Conn,
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
    ) -> list[tuple[int, PlatformOrder]]:
        """Inserts the orders not in the ledger yet, the agent taking them in holding the
        first lease on each; parks changed duplicates and rejected orders. Returns the new
        lines that are ready, with their orders, in order. The common case is one statement
        for the whole page (a flash sale), an intake event each in another."""
        fresh = [o for o in orders if isinstance(o, PlatformOrder)]
        rows = await conn.fetch(
            "INSERT INTO orders (platform, order_id, line, sku, quantity, state, paid_at, amount,"
            " currency, buyer_contact, deliver_by, seen_at, updated_at, claimed_by, lease_until)"
            " SELECT $1, o.order_id, 0, o.sku, o.quantity, 'new', o.paid_at, o.amount,"
            " o.currency, o.contact, o.deliver_by, $2, $2, $3, $4"
            " FROM unnest($5::text[], $6::text[], $7::int[], $8::text[], $9::text[], $10::text[],"
            " $11::text[], $12::text[]) WITH ORDINALITY"
            " AS o(order_id, sku, quantity, paid_at, amount, currency, contact, deliver_by, n)"
            " ORDER BY o.n ON CONFLICT (platform, order_id, line) DO NOTHING"
            " RETURNING id, order_id",
            platform,
            now,
            self.instance,
            now + self.lease_seconds,
            [o.order_id for o in fresh],
            [o.sku for o in fresh],
            [o.quantity for o in fresh],
            [o.paid_at for o in fresh],
            [o.amount for o in fresh],
            [o.currency for o in fresh],
            [o.buyer_contact for o in fresh],
            [o.deliver_by for o in fresh],
        )
        inserted = {row[1]: int(row[0]) for row in rows}
        ready: list[tuple[int, PlatformOrder]] = []
        for order in orders:
            if isinstance(order, RejectedOrder):
                await self._insert_rejected(conn, platform, order, now)
            elif order.order_id in inserted:
                # popped: the same id listed twice in a page is a duplicate the second time
                ready.append((inserted.pop(order.order_id), order))
            else:
                await self._check_duplicate(conn, platform, order, now)
        await self._events(
            conn,
            [
                (line_id, "intake", f"sku={o.sku} quantity={o.quantity} by {self.instance}")
                for line_id, o in ready
            ],
            now,
        )
        return ready

    async def _insert_rejected(
        self, conn: Conn, platform: str, order: RejectedOrder, now: float
    ) -> None:
        line_id = await conn.fetchval(
            "INSERT INTO orders (platform, order_id, line, sku, quantity, state, reason,"
            " seen_at, updated_at) VALUES ($1, $2, 0, $3, $4, 'needs_attention', $5, $6,"
            " $6) ON CONFLICT (platform, order_id, line) DO NOTHING RETURNING id",
            platform,
            order.order_id,
            order.sku,
            order.quantity,
            order.reason,
            now,
        )
        if line_id is not None:
            await self._event(conn, line_id, "rejected", order.reason, now)

    async def _check_duplicate(
        self, conn: Conn, platform: str, order: PlatformOrder, now: float
    ) -> None:
        """The same order id seen again: harmless if identical, parked if it changed."""
        row = await conn.fetchrow(
            "SELECT id, sku, quantity, state FROM orders"
            " WHERE platform = $1 AND order_id = $2 AND line = 0 FOR UPDATE",
            platform,
            order.order_id,
        )
        line_id, sku, quantity, state = row
        reason = changed_order_reason(sku, quantity, LineState(state), order)
        if reason is not None:
            await self._park(conn, line_id, reason, now)

    async def get_cursor(self, platform: str) -> str | None:
        async def run(conn: Conn) -> str | None:
            value = await conn.fetchval("SELECT cursor FROM cursors WHERE platform = $1", platform)
            return None if value is None else str(value)

        return await self._tx(run)

    async def set_cursor(self, platform: str, cursor: str | None, now: float) -> None:
        async def run(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO cursors (platform, cursor, updated_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (platform) DO UPDATE SET cursor = excluded.cursor,"
                " updated_at = excluded.updated_at",
                platform,
                cursor,
                now,
            )

        await self._tx(run)

    # --- claiming work ------------------------------------------------------------------------
    async def due_lines(self, now: float, limit: int) -> list[OrderLine]:
        """Lines due for work that no other agent holds, each now leased to this agent."""

        async def run(conn: Conn) -> list[OrderLine]:
            lease = now + self.lease_seconds
            rows = await conn.fetch(
                f"WITH due AS (SELECT id FROM orders"
                f" WHERE (state IN ('new', 'purchasing', 'allocated', 'delivering')"
                f"        OR (state = 'backordered' AND next_attempt_at > 0))"
                f" AND next_attempt_at <= $1 AND refund_key IS NULL AND {_LEASE_FREE}"
                f" ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)"
                f" UPDATE orders o SET claimed_by = $2, lease_until = $4 FROM due"
                f" WHERE o.id = due.id RETURNING {_qualified('o')}",
                now,
                self.instance,
                limit,
                lease,
            )
            due = sorted((line_from_row(r) for r in rows), key=lambda line: line.id)
            taken = {line.id for line in due}
            waiting = await conn.fetch(
                f"SELECT {LINE_COLUMNS} FROM orders WHERE state = 'backordered'"
                f" AND refund_key IS NULL AND {_LEASE_FREE} ORDER BY id LIMIT $3"
                f" FOR UPDATE SKIP LOCKED",
                now,
                self.instance,
                limit,
            )
            if waiting:
                # Oldest first, and only lines the free stock can now fill whole, so a
                # sweep does not churn on lines that would just be backordered again.
                free = {
                    r[0]: r[1]
                    for r in await conn.fetch(
                        "SELECT sku, COUNT(*) FROM card_keys WHERE state = 'free' GROUP BY sku"
                    )
                }
                fillable = []
                for line in map(line_from_row, waiting):
                    if line.id not in taken and free.get(line.sku, 0) >= line.quantity:
                        free[line.sku] -= line.quantity
                        fillable.append(line)
                if fillable:
                    await conn.execute(
                        "UPDATE orders SET claimed_by = $1, lease_until = $2"
                        " WHERE id = ANY($3::bigint[])",
                        self.instance,
                        lease,
                        [line.id for line in fillable],
                    )
                    due.extend(fillable)
            return due

        return await self._tx(run)

    async def take_line(self, line_id: int, now: float) -> OrderLine | None:
        """The line, leased to this agent; None if another agent holds it (or it is gone)."""

        async def run(conn: Conn) -> OrderLine | None:
            row = await conn.fetchrow(
                f"UPDATE orders SET claimed_by = $2, lease_until = $4"
                f" WHERE id = $3 AND {_LEASE_FREE} RETURNING {LINE_COLUMNS}",
                now,
                self.instance,
                line_id,
                now + self.lease_seconds,
            )
            return None if row is None else line_from_row(row)

        return await self._tx(run)

    async def get_line(self, line_id: int) -> OrderLine | None:
        async def run(conn: Conn) -> OrderLine | None:
            row = await conn.fetchrow(f"SELECT {LINE_COLUMNS} FROM orders WHERE id = $1", line_id)
            return None if row is None else line_from_row(row)

        return await self._tx(run)

    # --- the state machine --------------------------------------------------------------------
    async def allocate(self, line_id: int, now: float, *, backorder: bool = True) -> OrderLine:
        async def run(conn: Conn) -> OrderLine:
            return await self._allocate(
                conn, await self._lock_line(conn, line_id, now), now, backorder
            )

        return await self._tx(run)

    async def _allocate(
        self, conn: Conn, line: OrderLine, now: float, backorder: bool = True
    ) -> OrderLine:
        if line.state not in (LineState.NEW, LineState.BACKORDERED, LineState.PURCHASING):
            return line
        if await self._refunding(conn, line.id):
            return line
        bound = await conn.fetchval(
            "SELECT COUNT(*) FROM card_keys WHERE order_line_id = $1", line.id
        )
        needed = line.quantity - bound
        # SKIP LOCKED: keys another agent is binding right now are not ours to wait for.
        keys = await conn.fetch(
            "SELECT id, secret_hash FROM card_keys WHERE sku = $1 AND state = 'free'"
            " ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
            line.sku,
            needed,
        )
        if len(keys) < needed:
            # All or nothing: a half-filled line would hold keys another buyer could use now.
            if backorder and line.state != LineState.BACKORDERED:
                await conn.execute(
                    "UPDATE orders SET state = 'backordered', updated_at = $1, lease_until = NULL"
                    " WHERE id = $2",
                    now,
                    line.id,
                )
                await self._event(
                    conn, line.id, "backordered", f"need {needed}, free {len(keys)}", now
                )
            return await self._fetch_line(conn, line.id)
        await self._bind(conn, line.id, [k[0] for k in keys], bound, now)
        detail = allocated_detail((k[0], k[1]) for k in keys)
        await self._event(conn, line.id, "allocated", detail, now)
        return replace(line, state=LineState.ALLOCATED, next_attempt_at=0.0)

    @staticmethod
    async def _bind(
        conn: Conn, line_id: int, key_ids: list[int], first_slot: int, now: float
    ) -> None:
        """Binds locked free keys to the line's slots and marks the line allocated."""
        bound = await conn.execute(
            "UPDATE card_keys k SET state = 'bound', order_line_id = $1, slot = s.slot,"
            " bound_at = $2 FROM unnest($3::bigint[], $4::int[]) AS s(id, slot)"
            " WHERE k.id = s.id AND k.state = 'free'",
            line_id,
            now,
            key_ids,
            list(range(first_slot, first_slot + len(key_ids))),
        )
        if bound != f"UPDATE {len(key_ids)}":
            raise StoreError(f"order line {line_id}: a key was taken while binding ({bound})")
        await conn.execute(
            "UPDATE orders SET state = 'allocated', next_attempt_at = 0, updated_at = $1"
            " WHERE id = $2",
            now,
            line_id,
        )

    async def claim_for_delivery(self, line_id: int, now: float) -> DeliveryIntent | OrderLine:
        async def run(conn: Conn) -> DeliveryIntent | OrderLine:
            return await self._claim(conn, await self._lock_line(conn, line_id, now), now)

        return await self._tx(run)

    async def _claim(self, conn: Conn, line: OrderLine, now: float) -> DeliveryIntent | OrderLine:
        line = await self._allocate(conn, line, now)
        if line.state != LineState.ALLOCATED:
            return line
        try:
            return await self._begin_delivery(conn, line, now)
        except SealedKeyError:
            # Left allocated, its keys bound (so no other line takes the bad one): the
            # worker that takes it up parks it with the reason (begin_delivery refuses).
            return line

    async def take_in(
        self,
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
    ) -> list[DeliveryIntent | OrderLine]:
        if not orders:
            return []
        ordered = sorted(orders, key=lambda o: o.order_id)  # see ingest
        try:
            return await self._tx(self._take_in, platform, ordered, now, local_skus)
        except Exception as exc:
            if data_error(exc, DATA_ERRORS) is None:
                raise
        # A value of one order the ledger cannot take (agent/store/set_aside.py).
        return await take_in_one_by_one(
            platform,
            ordered,
            lambda one: self._tx(self._take_in, platform, one, now, local_skus),
            DATA_ERRORS,
        )

    async def _take_in(
        self,
        conn: Conn,
        platform: str,
        ordered: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
    ) -> list[DeliveryIntent | OrderLine]:
        ready = await self._ingest(conn, platform, ordered, now)
        claimed = await self._claim_new(conn, platform, ready, now, local_skus)
        taken: list[DeliveryIntent | OrderLine] = []
        for line_id, order in ready:
            intent = None if claimed is None else claimed.get(line_id)
            if intent is not None:
                taken.append(intent)
                continue
            line = new_line(line_id, platform, order, now)
            if claimed is not None and order.sku in local_skus:
                # Too few keys for it: the general path backorders it.
                taken.append(await self._claim(conn, line, now))
            else:
                taken.append(line)
        return taken

    async def _claim_new(
        self,
        conn: Conn,
        platform: str,
        ready: Sequence[tuple[int, PlatformOrder]],
        now: float,
        local_skus: Collection[str],
    ) -> dict[int, DeliveryIntent] | None:
        """Claims the new local-stock lines set-wise: the keys of each SKU locked in one
        query (SKIP LOCKED: keys another agent is binding are not ours to wait for), bound,
        the lines moved to `delivering` and their events written in one statement each.
        Returns the lines claimed; None if the keys do not open (a damaged ledger: the lines
        stay `new`, and the worker that takes each one up reports it)."""
        local = [(line_id, o) for line_id, o in ready if o.sku in local_skus]
        wanted = Counter[str]()
        for _, order in local:
            wanted[order.sku] += order.quantity
        free: FreeKeys = {}
        for sku, count in wanted.items():
            rows = await conn.fetch(
                "SELECT id, secret_hash, key_id, sealed FROM card_keys"
                " WHERE sku = $1 AND state = 'free' ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
                sku,
                count,
            )
            try:
                items = await self._open_rows(conn, [(sku, r[2], r[3], r[1]) for r in rows])
            except StoreKeyError:
                return None
            free[sku] = deque((r[0], r[1], item) for r, item in zip(rows, items, strict=True))
        claimed: dict[int, DeliveryIntent] = {}
        binds: list[tuple[int, int, int]] = []  # key id, line id, slot
        events: list[tuple[int, str, str]] = []
        for line_id, order in local:
            keys = take_keys(free, order.sku, order.quantity)
            if keys is None:
                continue
            key = intake_delivery_key(platform, order, keys)
            binds += [(k[0], line_id, slot) for slot, k in enumerate(keys)]
            events.append((line_id, "allocated", allocated_detail((k[0], k[1]) for k in keys)))
            events.append((line_id, "delivery_intent", f"attempt 1 key {key} by {self.instance}"))
            claimed[line_id] = claimed_at_intake(line_id, platform, order, now, keys, key)
        if not claimed:
            return claimed
        bound = await conn.execute(
            "UPDATE card_keys k SET state = 'bound', order_line_id = s.line_id, slot = s.slot,"
            " bound_at = $1 FROM unnest($2::bigint[], $3::bigint[], $4::int[])"
            " AS s(id, line_id, slot) WHERE k.id = s.id AND k.state = 'free'",
            now,
            [b[0] for b in binds],
            [b[1] for b in binds],
            [b[2] for b in binds],
        )
        if bound != f"UPDATE {len(binds)}":
            raise StoreError(f"intake: a key was taken while binding ({bound})")
        await conn.execute(
            "UPDATE orders o SET state = 'delivering', delivery_key = c.key, attempts = 1,"
            " next_attempt_at = 0, updated_at = $1 FROM unnest($2::bigint[], $3::text[])"
            " AS c(id, key) WHERE o.id = c.id",
            now,
            list(claimed),
            [intent.idempotency_key for intent in claimed.values()],
        )
        await self._events(conn, events, now)
        return claimed

    async def begin_delivery(self, line_id: int, now: float) -> DeliveryIntent:
        async def run(conn: Conn) -> DeliveryIntent:
            return await self._begin_delivery(conn, await self._lock_line(conn, line_id, now), now)

        return await self._tx(run)

    async def _begin_delivery(self, conn: Conn, line: OrderLine, now: float) -> DeliveryIntent:
        if line.state not in (LineState.ALLOCATED, LineState.DELIVERING):
            raise StoreError(f"order line {line.id} is {line.state}, not ready to deliver")
        keys = await conn.fetch(
            "SELECT id, sku, key_id, sealed, secret_hash FROM card_keys WHERE order_line_id = $1"
            " ORDER BY slot",
            line.id,
        )
        if len(keys) != line.quantity:
            raise StoreError(
                f"order line {line.id} holds {len(keys)} keys for quantity {line.quantity}"
            )
        # Opened before any write: a key that does not open refuses the delivery.
        items = tuple(await self._open_rows(conn, [k[1:] for k in keys]))
        generation = await conn.fetchval(
            "SELECT delivery_generation FROM orders WHERE id = $1", line.id
        )
        key = delivery_idempotency_key(
            line.platform, line.order_id, line.line, generation, (k[4] for k in keys)
        )
        await conn.execute(
            "UPDATE orders SET state = 'delivering', delivery_key = $1, attempts = attempts + 1,"
            " updated_at = $2 WHERE id = $3",
            key,
            now,
            line.id,
        )
        detail = f"attempt {line.attempts + 1} key {key} by {self.instance}"
        await self._event(conn, line.id, "delivery_intent", detail, now)
        return DeliveryIntent(
            line=replace(
                line, state=LineState.DELIVERING, delivery_key=key, attempts=line.attempts + 1
            ),
            idempotency_key=key,
            items=items,
            key_ids=tuple(k[0] for k in keys),
        )

    async def mark_delivered(self, line_id: int, now: float, detail: str) -> OrderLine:
        async def run(conn: Conn) -> OrderLine:
            line = await self._lock_line(conn, line_id, now)
            if line.state == LineState.DELIVERED:
                return line
            await conn.execute(
                "UPDATE orders SET state = 'delivered', delivered_at = $1, ambiguous = 0,"
                " reason = NULL, updated_at = $1, lease_until = NULL WHERE id = $2",
                now,
                line_id,
            )
            await self._event(conn, line_id, "delivered", detail, now)
            return replace(
                line, state=LineState.DELIVERED, delivered_at=now, ambiguous=False, reason=None
            )

        return await self._tx(run)

    async def mark_many_delivered(self, deliveries: Sequence[tuple[int, str]], now: float) -> None:
        async def run(conn: Conn) -> None:
            details = dict(deliveries)
            changed = await conn.fetch(
                "UPDATE orders SET state = 'delivered', delivered_at = $1, ambiguous = 0,"
                " reason = NULL, updated_at = $1, claimed_by = $2, lease_until = NULL"
                " WHERE id = ANY($3::bigint[]) AND state != 'delivered' RETURNING id",
                now,
                self.instance,
                list(details),
            )
            await self._events(
                conn, [(row[0], "delivered", details[row[0]]) for row in changed], now
            )

        if deliveries:
            await self._tx(run)

    async def defer(
        self, line_id: int, next_attempt_at: float, reason: str, *, ambiguous: bool, now: float
    ) -> None:
        async def run(conn: Conn) -> None:
            # The lease goes: whichever agent sweeps when it is due takes the line.
            await conn.execute(
                "UPDATE orders SET next_attempt_at = $1, reason = $2, ambiguous = $3,"
                " updated_at = $4, lease_until = NULL WHERE id = $5",
                next_attempt_at,
                reason,
                int(ambiguous),
                now,
                line_id,
            )
            await self._event(conn, line_id, "retry_scheduled", reason, now)

        await self._tx(run)

    async def add_event(self, line_id: int, kind: str, detail: str, now: float) -> None:
        async def run(conn: Conn) -> None:
            await self._event(conn, line_id, kind, detail, now)

        await self._tx(run)

    async def park(self, line_id: int, reason: str, now: float) -> None:
        await self._tx(self._park, line_id, reason, now)

    async def _park(self, conn: Conn, line_id: int, reason: str, now: float) -> None:
        await conn.execute(
            "UPDATE orders SET state = 'needs_attention', reason = $1, updated_at = $2,"
            " lease_until = NULL WHERE id = $3",
            reason,
            now,
            line_id,
        )
        await self._event(conn, line_id, "parked", reason, now)

    async def close_line(self, line_id: int, state: LineState, reason: str, now: float) -> None:
        if state not in (LineState.CANCELLED, LineState.REFUNDED):
            raise StoreError(f"close_line takes cancelled or refunded, not {state}")

        async def run(conn: Conn) -> None:
            await conn.execute(
                "UPDATE orders SET state = $1, reason = $2, updated_at = $3, lease_until = NULL"
                " WHERE id = $4",
                state.value,
                reason,
                now,
                line_id,
            )
            await self._event(conn, line_id, str(state), reason, now)

        await self._tx(run)

    async def backorder(
        self, line_id: int, next_attempt_at: float, reason: str, now: float
    ) -> None:
        async def run(conn: Conn) -> None:
            await conn.execute(
                "UPDATE orders SET state = 'backordered', next_attempt_at = $1, reason = $2,"
                " updated_at = $3, lease_until = NULL"
                " WHERE id = $4 AND state IN ('new', 'backordered', 'purchasing')",
                next_attempt_at,
                reason,
                now,
                line_id,
            )
            await self._event(conn, line_id, "backordered", reason, now)

        await self._tx(run)

    # --- operator actions -----------------------------------------------------------------------
    async def retry_line(self, line_id: int, now: float) -> OrderLine:
        async def run(conn: Conn) -> OrderLine:
            line = await self._lock_line(conn, line_id, now)
            if line.state != LineState.NEEDS_ATTENTION:
                raise StoreError(
                    f"order {line.order_id} is {line.state}; only needs_attention can be retried"
                )
            bound = await conn.fetchval(
                "SELECT COUNT(*) FROM card_keys WHERE order_line_id = $1", line_id
            )
            open_purchase = await conn.fetchval(
                "SELECT COUNT(*) FROM purchases WHERE order_line_id = $1"
                " AND state IN ('intent', 'unknown', 'processing')",
                line_id,
            )
            state, ambiguous = retry_target(line, bound, open_purchase > 0)
            await conn.execute(
                "UPDATE orders SET state = $1, reason = NULL, attempts = 0, next_attempt_at = 0,"
                " ambiguous = $2, updated_at = $3, lease_until = NULL WHERE id = $4",
                state.value,
                int(ambiguous),
                now,
                line_id,
            )
            await self._event(conn, line_id, "operator_retry", f"back to {state}", now)
            return await self._fetch_line(conn, line_id)

        return await self._tx(run)

    async def resend_line(self, line_id: int, now: float) -> OrderLine:
        async def run(conn: Conn) -> OrderLine:
            line = await self._lock_line(conn, line_id, now)
            if line.state != LineState.DELIVERED:
                raise StoreError(
                    f"order {line.order_id} is {line.state}; only delivered orders can be resent"
                )
            # A new generation gives a new idempotency key, so the platform sends it again
            # (same keys: resend never hands out a second set).
            await conn.execute(
                "UPDATE orders SET state = 'delivering', delivery_generation ="
                " delivery_generation + 1, attempts = 0, next_attempt_at = 0, ambiguous = 0,"
                " updated_at = $1, lease_until = NULL WHERE id = $2",
                now,
                line_id,
            )
            await self._event(conn, line_id, "operator_resend", "same keys, new delivery", now)
            return await self._fetch_line(conn, line_id)

        return await self._tx(run)

    async def find_lines(self, order_ref: str) -> list[OrderLine]:
        async def run(conn: Conn) -> list[OrderLine]:
            rows = await conn.fetch(
                f"SELECT {LINE_COLUMNS} FROM orders WHERE order_id = $1 ORDER BY id", order_ref
            )
            if not rows and order_ref.isdigit():
                rows = await conn.fetch(
                    f"SELECT {LINE_COLUMNS} FROM orders WHERE id = $1", int(order_ref)
                )
            return [line_from_row(r) for r in rows]

        return await self._tx(run)

    async def delivered_lines_of(self, platform: str, order_ids: Sequence[str]) -> list[OrderLine]:
        async def run(conn: Conn) -> list[OrderLine]:
            rows = await conn.fetch(
                f"SELECT {LINE_COLUMNS} FROM orders WHERE platform = $1 AND state = 'delivered'"
                " AND order_id = ANY($2::text[])",
                platform,
                list(order_ids),
            )
            return [line_from_row(r) for r in rows]

        return await self._tx(run)

    async def list_lines(self, state: LineState | None, limit: int) -> list[OrderLine]:
        async def run(conn: Conn) -> list[OrderLine]:
            rows = await conn.fetch(
                f"SELECT {LINE_COLUMNS} FROM orders WHERE $1::text IS NULL OR state = $1"
                f" ORDER BY id DESC LIMIT $2",
                None if state is None else state.value,
                limit,
            )
            return [line_from_row(r) for r in rows]

        return await self._tx(run)

    async def events(self, line_id: int) -> list[OrderEvent]:
        async def run(conn: Conn) -> list[OrderEvent]:
            rows = await conn.fetch(
                "SELECT at, kind, detail FROM events WHERE order_line_id = $1 ORDER BY id",
                line_id,
            )
            return [OrderEvent(at=r[0], kind=r[1], detail=r[2]) for r in rows]

        return await self._tx(run)

    async def count_by_state(self) -> dict[LineState, int]:
        async def run(conn: Conn) -> dict[LineState, int]:
            rows = await conn.fetch("SELECT state, COUNT(*) FROM orders GROUP BY state")
            return {LineState(r[0]): r[1] for r in rows}

        return await self._tx(run)


def _qualified(alias: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in LINE_COLUMNS.split(","))

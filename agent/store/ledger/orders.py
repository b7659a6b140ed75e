"""The ledger of order lines: intake, the line's state machine, operator actions, and the
reads the commands and the engine make of it. Written once for both databases."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from agent import lifecycle
from agent.domain import (
    CardItem,
    DeliveryIntent,
    LineState,
    OrderEvent,
    OrderLine,
    PlatformOrder,
    RejectedOrder,
    delivery_idempotency_key,
)
from agent.i18n import N_
from agent.keybox import SealedKeyError, StoreKeyError
from agent.phrased import phrased
from agent.reasons import NEED_FREE, READ_AGAIN, SAME_KEYS_AGAIN, english
from agent.store.base import DeliveredSince, StoreError
from agent.store.ledger.core import (
    COUNT_BOUND,
    DELIVERED,
    FETCH_LINE,
    FREE_KEYS,
    HOLDINGS,
    LINE_KEYS,
    MARK_DELIVERED,
    PARK,
    LedgerCore,
    read,
    write,
)
from agent.store.rows import (
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
from agent.store.tx import Bulk, Tx

WAITING = lifecycle.states_in("waiting")
NEW, DELIVERING = LineState.NEW.value, LineState.DELIVERING.value  # read once: intake's loop
KNOWN = (
    "SELECT order_id, id, sku, quantity, state FROM orders WHERE platform = $1 AND line = 0"
    " AND order_id = ANY($2::text[])"
)
INSERT_LINE = Bulk(
    "INSERT INTO orders (platform, order_id, line, sku, quantity, state, reason, paid_at,"
    " amount, currency, buyer_contact, deliver_by, seen_at, updated_at, delivery_key,"
    " attempts{lease_columns}) VALUES ($1, $2, 0, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
    " $12, $13, $14{lease_values:12}) ON CONFLICT (platform, order_id, line) DO NOTHING",
    ("text",) * 3 + ("int",) + ("text",) * 7 + ("float8", "text", "int"),
)
# Retrying a line, or revising a parked one, wants it parked.
NOT_PARKED = N_("order %(order)s is %(state)s; only needs_attention can be retried")
REPLACEMENT_GRACE = 300.0  # seconds a replaced key's new delivery is left to its caller
CLAIM = Bulk(
    "UPDATE orders SET state = 'delivering', delivery_key = $1, attempts = 1,"
    " next_attempt_at = 0, updated_at = $2 WHERE id = $3",
    ("text", "float8", "bigint"),
)
DELAY = Bulk(
    "UPDATE orders SET next_attempt_at = $1 WHERE id = $2 AND state = 'new'",
    ("float8", "bigint"),
)
# The keys taken for a new line at intake, and the idempotency key of their delivery.
_Keys = tuple[list[tuple[int, bytes, CardItem]], str]


def _claim_keys(free: FreeKeys | None, platform: str, order: PlatformOrder) -> _Keys | None:
    keys = take_keys(free, order.sku, order.quantity) if free else None
    return None if keys is None else (keys, intake_delivery_key(platform, order, keys))


class OrdersLedger(LedgerCore):
    # One writer takes keys for new lines before inserting them (see _take_in).
    _keys_before_insert = True

    # --- intake ---------------------------------------------------------------------------
    async def ingest(
        self, platform: str, orders: Sequence[PlatformOrder | RejectedOrder], now: float
    ) -> list[int]:
        if not orders:
            return []
        ordered = self._intake_order(orders)
        taken = await self._write(lambda tx: self._take_in(tx, platform, ordered, now, ()))
        return [t.id for t in taken if isinstance(t, OrderLine)]

    async def take_in(
        self,
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
        delays: Mapping[str, float] | None = None,
    ) -> list[DeliveryIntent | OrderLine]:
        """ingest, and claim_for_delivery of each new local-stock line, in one transaction.
        `delays`: SKU -> seconds its new lines wait before their keys are sent (their
        next_attempt_at; such a SKU is not claimed here)."""
        if not orders:
            return []
        ordered = self._intake_order(orders)

        async def take(one: Sequence[PlatformOrder | RejectedOrder]) -> list[Any]:
            return await self._write(
                lambda tx: self._take_in(tx, platform, one, now, local_skus, delays)
            )

        try:
            return await take(ordered)
        except Exception as exc:
            if data_error(exc, self._data_errors) is None:
                raise
        # A value of one order the ledger cannot take (agent/store/set_aside.py).
        return await take_in_one_by_one(platform, ordered, take, self._data_errors)

    async def _take_in(
        self,
        tx: Tx,
        platform: str,
        orders: Sequence[PlatformOrder | RejectedOrder],
        now: float,
        local_skus: Collection[str],
        delays: Mapping[str, float] | None = None,
    ) -> list[DeliveryIntent | OrderLine]:
        """Inserts the orders not in the ledger yet in one statement (one per row where a
        database runs it so) and claims the new local-stock lines set-wise (a flash sale is
        mostly this); parks changed duplicates; claims the local lines short of keys the
        general way (they end backordered). Returns each new line that is ready, claimed or
        not. One writer (SQLite) takes the keys first and inserts such a line claimed
        already; agents sharing a ledger insert first and take keys only for the lines they
        inserted (another agent may be inserting some of the same orders)."""
        rows = await tx.fetch(KNOWN, platform, [o.order_id for o in orders])
        known: dict[str, tuple[Any, ...]] = {r[0]: tuple(r[1:]) for r in rows}
        fresh = [o for o in orders if isinstance(o, PlatformOrder) and o.order_id not in known]
        early = self._keys_before_insert
        free = await self._free_keys_for(tx, fresh, local_skus, now) if early else {}
        planned: list[tuple[PlatformOrder | RejectedOrder, _Keys | None]] = []
        inserts: list[tuple[Any, ...]] = []
        duplicates: list[PlatformOrder | RejectedOrder] = []
        for order in orders:
            if order.order_id in known:
                duplicates.append(order)
                continue
            known[order.order_id] = (None, order.sku, order.quantity, NEW)
            head = (platform, order.order_id, order.sku, order.quantity)
            if isinstance(order, RejectedOrder):
                planned.append((order, None))
                inserts.append((*head, "needs_attention", order.reason, *(None,) * 5, now, None, 0))
                continue
            keys = _claim_keys(free, platform, order)
            planned.append((order, keys))
            paid = (order.paid_at, order.amount, order.currency, order.buyer_contact)
            rest = (order.deliver_by, now, None if keys is None else keys[1], int(keys is not None))
            inserts.append((*head, NEW if keys is None else DELIVERING, None, *paid, *rest))
        ids = await tx.insert_many(INSERT_LINE, inserts, key=1)
        ready: list[tuple[int, PlatformOrder, _Keys | None]] = []
        events: list[tuple[int, str, str]] = []
        for (order, keys), line_id, row in zip(planned, ids, inserts, strict=True):
            if line_id is None:  # another agent took it in meanwhile (a shared ledger)
                known.pop(order.order_id)  # its row is read, locked, by _check_duplicate
                duplicates.append(order)
                continue
            known[order.order_id] = (line_id, order.sku, order.quantity, row[4])
            if isinstance(order, RejectedOrder):
                events.append((line_id, "rejected", order.reason))
                continue
            detail = f"sku={order.sku} quantity={order.quantity}{self._by}"
            events.append((line_id, "intake", detail))
            ready.append((line_id, order, keys))
        if not early:
            free = await self._free_keys_for(tx, [r[1] for r in ready], local_skus, now)
            claims = []
            for n, (line_id, order, _) in enumerate(ready):
                if (keys := _claim_keys(free, platform, order)) is not None:
                    ready[n] = (line_id, order, keys)
                    claims.append((keys[1], now, line_id))
            if claims:
                await tx.executemany(CLAIM, claims)
        binds: list[tuple[int, int, float, int]] = []
        taken: list[DeliveryIntent | OrderLine] = []
        for line_id, _, keys in ready:
            if keys is None:
                continue
            binds += [(line_id, slot, now, k[0]) for slot, k in enumerate(keys[0])]
            events.append((line_id, "allocated", allocated_detail(k[:2] for k in keys[0])))
            events.append((line_id, "delivery_intent", f"attempt 1 key {keys[1]}{self._by}"))
        if binds:
            taken_meanwhile = N_("intake: a key was taken while binding (%(bound)s of %(wanted)s)")
            await self._bind_keys(tx, binds, taken_meanwhile)
        await self._events(tx, events, now)
        waits = await self._delay(tx, ready, now, delays) if delays else {}
        for order in duplicates:
            await self._check_duplicate(tx, platform, order, known.get(order.order_id), now)
        for line_id, order, keys in ready:
            if keys is not None:
                taken.append(claimed_at_intake(line_id, platform, order, now, *keys))
            elif free is not None and order.sku in local_skus:
                # Too few keys for it: the general path backorders it.
                taken.append(await self._claim(tx, await self._fetch_line(tx, line_id), now))
            else:
                line = new_line(line_id, platform, order, now)
                if line_id in waits:
                    line = replace(line, next_attempt_at=waits[line_id])
                taken.append(line)
        return taken

    @staticmethod
    async def _delay(
        tx: Tx,
        ready: Sequence[tuple[int, PlatformOrder, _Keys | None]],
        now: float,
        delays: Mapping[str, float],
    ) -> dict[int, float]:
        """Sets when the unclaimed new lines of delayed SKUs are due: line id -> that time."""
        waits = {
            line_id: now + delays[order.sku]
            for line_id, order, keys in ready
            if keys is None and delays.get(order.sku, 0) > 0
        }
        if waits:
            await tx.executemany(DELAY, [(at, line_id) for line_id, at in waits.items()])
        return waits

    async def _free_keys_for(
        self,
        tx: Tx,
        orders: Sequence[PlatformOrder],
        local_skus: Collection[str],
        now: float,
    ) -> FreeKeys | None:
        """Enough free keys, opened, for `orders` of `local_skus` (locked, skipping keys
        another agent is binding). None if one does not open (a damaged ledger): the lines
        are then left `new`, and the worker that takes each up reports it."""
        wanted = Counter[str]()
        for order in orders:
            if order.sku in local_skus:
                wanted[order.sku] += order.quantity
        free: FreeKeys = {}
        for sku, count in wanted.items():
            rows = await tx.fetch(FREE_KEYS, sku, count, now)
            try:
                items = await self._open_rows(tx, [(sku, r[2], r[3], r[1]) for r in rows])
            except StoreKeyError:
                return None
            free[sku] = deque((r[0], r[1], item) for r, item in zip(rows, items, strict=True))
        return free

    async def _check_duplicate(
        self,
        tx: Tx,
        platform: str,
        order: PlatformOrder | RejectedOrder,
        seen: tuple[Any, ...] | None,
        now: float,
    ) -> None:
        """The same order id seen again: harmless if identical, parked if it changed. What
        looks changed is read again, locked, before the line is parked."""
        if isinstance(order, RejectedOrder):
            return
        if seen is not None:
            _, sku, quantity, state = seen
            if changed_order_reason(sku, quantity, LineState(state), order) is None:
                return
        row = await tx.fetchrow(KNOWN + "{for_update}", platform, [order.order_id])
        assert row is not None  # a duplicate's row: it is in the ledger
        reason = changed_order_reason(row[2], row[3], LineState(row[4]), order)
        if reason is not None:
            await self._park(tx, row[1], reason, now)

    @read
    async def get_cursor(self, tx: Tx, platform: str) -> str | None:
        value = await tx.fetchval("SELECT cursor FROM cursors WHERE platform = $1", platform)
        return None if value is None else str(value)

    @write
    async def set_cursor(self, tx: Tx, platform: str, cursor: str | None, now: float) -> None:
        await tx.execute(
            "INSERT INTO cursors (platform, cursor, updated_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (platform) DO UPDATE SET cursor = excluded.cursor,"
            " updated_at = excluded.updated_at",
            platform,
            cursor,
            now,
        )

    # --- claiming work ----------------------------------------------------------------------
    @write
    async def due_lines(self, tx: Tx, now: float, limit: int) -> list[OrderLine]:
        due = await self._lines(
            tx,
            "WHERE (state IN {line_class:due}"
            "  OR (state IN {line_class:scheduled} AND next_attempt_at > 0))"
            " AND next_attempt_at <= $1 AND refund_key IS NULL{lease_free:1}"
            " ORDER BY id LIMIT $2{skip_locked}",
            now,
            limit,
        )
        taken = {line.id for line in due}
        waiting = await self._lines(
            tx,
            "WHERE state IN {line_class:scheduled}"
            " AND refund_key IS NULL{lease_free:1} ORDER BY id LIMIT $2{skip_locked}",
            now,
            limit,
        )
        if waiting:
            free = await self._sellable_counts(tx, now)
            for line in waiting:
                if line.id not in taken and free.get(line.sku, 0) >= line.quantity:
                    free[line.sku] -= line.quantity
                    due.append(line)
        await self._lease(tx, [line.id for line in due], now)
        return due

    @read
    async def get_line(self, tx: Tx, line_id: int) -> OrderLine | None:
        row = await tx.fetchrow(FETCH_LINE, line_id)
        return None if row is None else line_from_row(row)

    # --- the state machine ----------------------------------------------------------------
    @write
    async def allocate(
        self, tx: Tx, line_id: int, now: float, *, backorder: bool = True
    ) -> OrderLine:
        return await self._allocate(tx, await self._lock_line(tx, line_id, now), now, backorder)

    async def _allocate(
        self, tx: Tx, line: OrderLine, now: float, backorder: bool = True
    ) -> OrderLine:
        if line.state not in WAITING or await self._refunding(tx, line.id):
            return line
        needed = line.quantity - await tx.fetchval(COUNT_BOUND, line.id)
        keys = await tx.fetch(FREE_KEYS, line.sku, needed, now)
        if len(keys) < needed:
            # All or nothing: a half-filled line would hold keys another buyer could use now.
            if backorder and line.state != LineState.BACKORDERED:
                # Backordered here only where no supplier stands behind the SKU: it waits for
                # stock (next_attempt_at 0), its delivery delay, if any, spent.
                detail = english(NEED_FREE, needed=needed, free=len(keys))
                await self._backorder(tx, line.id, 0.0, None, detail, now)
            return await self._fetch_line(tx, line.id)
        detail = allocated_detail(k[:2] for k in keys)
        await self._bind(tx, line.id, [k[0] for k in keys], line.quantity - needed, detail, now)
        # What the statements wrote, without reading the row back (hot path).
        return replace(line, state=LineState.ALLOCATED, next_attempt_at=0.0)

    async def _bind(
        self, tx: Tx, line_id: int, key_ids: list[int], first_slot: int, detail: str, now: float
    ) -> None:
        """Binds free keys (locked by this transaction) to the line's slots from
        `first_slot` on, and marks the line allocated (its event saying `detail`)."""
        binds = [(line_id, first_slot + n, now, key_id) for n, key_id in enumerate(key_ids)]
        taken_meanwhile = N_("order line %(line)s: a key was taken while binding (%(bound)s)")
        await self._bind_keys(tx, binds, taken_meanwhile, line=line_id)
        await tx.execute(
            "UPDATE orders SET state = 'allocated', next_attempt_at = 0, updated_at = $1"
            " WHERE id = $2",
            now,
            line_id,
        )
        await self._event(tx, line_id, "allocated", detail, now)

    @write
    async def claim_for_delivery(
        self, tx: Tx, line_id: int, now: float
    ) -> DeliveryIntent | OrderLine:
        return await self._claim(tx, await self._lock_line(tx, line_id, now), now)

    async def _claim(self, tx: Tx, line: OrderLine, now: float) -> DeliveryIntent | OrderLine:
        line = await self._allocate(tx, line, now)
        if line.state != LineState.ALLOCATED:
            return line
        try:
            return await self._begin_delivery(tx, line, now)
        except SealedKeyError:
            # Left allocated, its keys bound (so no other line takes the bad one): the
            # worker that takes it up parks it with the reason (begin_delivery refuses).
            return line

    @write
    async def begin_delivery(self, tx: Tx, line_id: int, now: float) -> DeliveryIntent:
        return await self._begin_delivery(tx, await self._lock_line(tx, line_id, now), now)

    async def _begin_delivery(self, tx: Tx, line: OrderLine, now: float) -> DeliveryIntent:
        if line.state not in (LineState.ALLOCATED, LineState.DELIVERING):
            raise phrased(
                StoreError,
                N_("order line %(line)s is %(state)s, not ready to deliver"),
                line=line.id,
                state=line.state,
            )
        keys = await tx.fetch(LINE_KEYS, line.id)
        if len(keys) != line.quantity:
            raise phrased(
                StoreError,
                N_("order line %(line)s holds %(held)s keys for quantity %(quantity)s"),
                line=line.id,
                held=len(keys),
                quantity=line.quantity,
            )
        # Opened before any write: a key that does not open refuses the delivery.
        items = tuple(await self._open_rows(tx, [k[1:] for k in keys]))
        generation = await tx.fetchval(
            "SELECT delivery_generation FROM orders WHERE id = $1", line.id
        )
        key = delivery_idempotency_key(
            line.platform, line.order_id, line.line, generation, (k[4] for k in keys)
        )
        await tx.execute(
            "UPDATE orders SET state = 'delivering', delivery_key = $1, attempts = attempts + 1,"
            " updated_at = $2 WHERE id = $3",
            key,
            now,
            line.id,
        )
        detail = f"attempt {line.attempts + 1} key {key}{self._by}"
        await self._event(tx, line.id, "delivery_intent", detail, now)
        return DeliveryIntent(
            line=replace(
                line, state=LineState.DELIVERING, delivery_key=key, attempts=line.attempts + 1
            ),
            idempotency_key=key,
            items=items,
            key_ids=tuple(k[0] for k in keys),
        )

    @write
    async def mark_delivered(self, tx: Tx, line_id: int, now: float, detail: str) -> OrderLine:
        line = await self._lock_line(tx, line_id, now)
        if line.state == LineState.DELIVERED:
            return line
        await tx.execute(MARK_DELIVERED, now, line_id)
        await self._event(tx, line_id, "delivered", detail, now)
        return replace(
            line, state=LineState.DELIVERED, delivered_at=now, ambiguous=False, reason=None
        )

    @write
    async def mark_many_delivered(
        self, tx: Tx, deliveries: Sequence[tuple[int, str]], now: float
    ) -> None:
        if not deliveries:
            return
        details = dict(deliveries)
        changed = await tx.fetch(
            DELIVERED + "{release_ours} WHERE id = ANY($2::bigint[]) AND {line_to:delivered}"
            " RETURNING id",
            now,
            list(details),
        )
        await self._events(tx, [(r[0], "delivered", details[r[0]]) for r in changed], now)

    @write
    async def defer(
        self,
        tx: Tx,
        line_id: int,
        next_attempt_at: float,
        reason: str,
        *,
        ambiguous: bool,
        now: float,
    ) -> None:
        """Keep the state, try again at next_attempt_at (long waits live in the row); on a
        shared ledger the lease goes, and whichever agent sweeps then takes the line."""
        await tx.execute(
            "UPDATE orders SET next_attempt_at = $1, reason = $2, ambiguous = $3,"
            " updated_at = $4{release} WHERE id = $5",
            next_attempt_at,
            reason,
            int(ambiguous),
            now,
            line_id,
        )
        await self._event(tx, line_id, "retry_scheduled", reason, now)

    @write
    async def add_event(self, tx: Tx, line_id: int, kind: str, detail: str, now: float) -> None:
        await self._event(tx, line_id, kind, detail, now)

    @write
    async def park(self, tx: Tx, line_id: int, reason: str, now: float) -> None:
        await self._park(tx, line_id, reason, now)

    async def _park(self, tx: Tx, line_id: int, reason: str, now: float) -> None:
        await tx.execute(PARK, reason, now, line_id)
        await self._event(tx, line_id, "parked", reason, now)

    @write
    async def close_line(
        self, tx: Tx, line_id: int, state: LineState, reason: str, now: float
    ) -> None:
        if state not in (LineState.CANCELLED, LineState.REFUNDED):
            raise phrased(
                StoreError,
                N_("close_line takes cancelled or refunded, not %(state)s"),
                state=state,
            )
        await tx.execute(
            "UPDATE orders SET state = $1, reason = $2, updated_at = $3{release} WHERE id = $4",
            state.value,
            reason,
            now,
            line_id,
        )
        await self._event(tx, line_id, str(state), reason, now)

    @write
    async def backorder(
        self, tx: Tx, line_id: int, next_attempt_at: float, reason: str, now: float
    ) -> None:
        await self._backorder(tx, line_id, next_attempt_at, reason, reason, now)

    async def _backorder(
        self,
        tx: Tx,
        line_id: int,
        next_attempt_at: float | None,
        reason: str | None,
        detail: str,
        now: float,
    ) -> None:
        """-> backordered, recorded with `detail`; its time and reason as given (None: left
        as they are)."""
        await tx.execute(
            "UPDATE orders SET state = 'backordered',"
            " next_attempt_at = COALESCE($1, next_attempt_at), reason = COALESCE($2, reason),"
            " updated_at = $3{release} WHERE id = $4 AND {line_to:backordered}",
            next_attempt_at,
            reason,
            now,
            line_id,
        )
        await self._event(tx, line_id, "backordered", detail, now)

    # --- operator actions -------------------------------------------------------------------
    @write
    async def retry_line(self, tx: Tx, line_id: int, now: float) -> OrderLine:
        line = await self._lock_line_in(tx, line_id, now, LineState.NEEDS_ATTENTION, NOT_PARKED)
        bound = await tx.fetchval(COUNT_BOUND, line_id)
        # What it holds besides its keys: a purchase open for it.
        state, ambiguous = retry_target(line, bound, await tx.fetchval(HOLDINGS, line_id) > bound)
        if state == LineState.NEW and line.quantity < 1:
            # Parked at intake with no quantity: back to work it would deliver no keys.
            raise phrased(
                StoreError,
                N_(
                    "order %(order)s was parked before its quantity was known: retry it with"
                    " `kami-agent orders retry`, which reads the order again from its platform"
                ),
                order=line.order_id,
            )
        await self._reopen(tx, line_id, state, ambiguous, f"back to {state}", now)
        return await self._fetch_line(tx, line_id)

    async def _reopen(
        self, tx: Tx, line_id: int, state: LineState, ambiguous: bool, detail: str, now: float
    ) -> None:
        """A parked line back to work in `state`, afresh: the operator's retry."""
        await tx.execute(
            "UPDATE orders SET state = $1, reason = NULL, attempts = 0, next_attempt_at = 0,"
            " ambiguous = $2, updated_at = $3{release} WHERE id = $4",
            state.value,
            int(ambiguous),
            now,
            line_id,
        )
        await self._event(tx, line_id, "operator_retry", detail, now)

    @write
    async def resend_line(self, tx: Tx, line_id: int, now: float) -> OrderLine:
        await self._lock_line_in(
            tx,
            line_id,
            now,
            LineState.DELIVERED,
            N_("order %(order)s is %(state)s; only delivered orders can be resent"),
        )
        await tx.execute(
            "UPDATE orders SET state = 'delivering', delivery_generation ="
            " delivery_generation + 1, attempts = 0, next_attempt_at = 0, ambiguous = 0,"
            " updated_at = $1{release} WHERE id = $2",
            now,
            line_id,
        )
        await self._event(tx, line_id, "operator_resend", SAME_KEYS_AGAIN, now)
        return await self._fetch_line(tx, line_id)

    @write
    async def replace_key(
        self, tx: Tx, line_id: int, slot: int | None, reason: str, now: float
    ) -> tuple[OrderLine, str]:
        """A bad key on a delivered line replaced, in one transaction: the key in `slot`
        (None: the line's only key) goes void with the reason, naming the line it was bound
        to (the database lets a bound key go void only so), a fresh free key of the SKU takes
        its slot, and the line goes delivering with a new delivery generation (so a new
        idempotency key). Returns (line, the delivery key it was delivered with: what the
        replacement replaces). StoreError says why not, with nothing changed."""
        line = await self._lock_line_in(
            tx,
            line_id,
            now,
            LineState.DELIVERED,
            N_("order %(order)s is %(state)s; only a delivered order's key can be replaced"),
        )
        if not reason.strip():
            raise phrased(StoreError, N_("a reason is required to replace a key"))
        previous = line.delivery_key
        if previous is None:
            raise phrased(
                StoreError,
                N_("order %(order)s has no delivery to replace"),
                order=line.order_id,
            )
        bound = await tx.fetch(
            "SELECT id, slot FROM card_keys WHERE order_line_id = $1 ORDER BY slot", line_id
        )
        if slot is None and len(bound) != 1:
            raise phrased(
                StoreError,
                N_("order %(order)s holds %(held)s keys: name the slot to replace (0 to %(last)s)"),
                order=line.order_id,
                held=len(bound),
                last=len(bound) - 1,
            )
        chosen = [k for k in bound if slot is None or k[1] == slot]
        if not chosen:
            raise phrased(
                StoreError,
                N_("order %(order)s has no key in slot %(slot)s"),
                order=line.order_id,
                slot=slot,
            )
        old_id, old_slot = chosen[0]
        fresh = await tx.fetch(FREE_KEYS, line.sku, 1, now)
        if not fresh:
            raise phrased(
                StoreError,
                N_("no free key of %(sku)s to replace the bad one with"),
                sku=line.sku,
            )
        await tx.execute(
            "UPDATE card_keys SET state = 'void', void_reason = $1, was_bound_to = order_line_id,"
            " order_line_id = NULL, slot = NULL WHERE id = $2 AND state = 'bound'",
            reason,
            old_id,
        )
        taken_meanwhile = N_("order line %(line)s: the fresh key was taken while binding")
        await self._bind_keys(
            tx, [(line_id, old_slot, now, fresh[0][0])], taken_meanwhile, line=line_id
        )
        await tx.execute(
            "UPDATE orders SET state = 'delivering', delivery_generation ="
            " delivery_generation + 1, attempts = 0, next_attempt_at = $1, ambiguous = 0,"
            " replaces = $4, updated_at = $2 WHERE id = $3 AND {line_to:delivering}",
            # The caller delivers the replacement at once; the engine's sweep takes the line
            # up (and replaces, as `replaces` says) only if that caller died meanwhile.
            now + REPLACEMENT_GRACE,
            now,
            line_id,
            previous,
        )
        detail = f"slot {old_slot} replaced ({reason}); replaces delivery {previous}"
        await self._event(tx, line_id, "key_replaced", detail, now)
        return await self._fetch_line(tx, line_id), previous

    @write
    async def revise_parked_line(
        self, tx: Tx, line_id: int, sku: str, quantity: int, reason: str | None, now: float
    ) -> OrderLine:
        """A parked line that holds nothing yet (no keys, no delivery, no purchase open), with
        the SKU and quantity its platform states now: back to `new` (reason None), or parked
        again with `reason` (the order's screening refused it again)."""
        line = await self._lock_line_in(tx, line_id, now, LineState.NEEDS_ATTENTION, NOT_PARKED)
        if line.delivery_key is not None or await tx.fetchval(HOLDINGS, line_id):
            raise phrased(
                StoreError,
                N_("order %(order)s holds keys or a purchase: retry it as it is"),
                order=line.order_id,
            )
        if quantity < 1:
            raise phrased(
                StoreError,
                N_("order %(order)s: a quantity must be at least 1"),
                order=line.order_id,
            )
        content = f"sku={sku} quantity={quantity}"
        await tx.execute(
            "UPDATE orders SET sku = $1, quantity = $2 WHERE id = $3", sku, quantity, line_id
        )
        if reason is None:
            await self._reopen(tx, line_id, LineState.NEW, False, f"back to new as {content}", now)
        else:
            await tx.execute(PARK, reason, now, line_id)
            detail = english(READ_AGAIN, content=content, reason=reason)
            await self._event(tx, line_id, "parked", detail, now)
        return await self._fetch_line(tx, line_id)

    # --- reads ----------------------------------------------------------------------------
    @read
    async def bound_count(self, tx: Tx, line_id: int) -> int:
        return int(await tx.fetchval(COUNT_BOUND, line_id))

    @read
    async def buyer_lines(
        self, tx: Tx, contacts: Sequence[str], since: float
    ) -> list[tuple[str, str, str, str, int]]:
        """(platform, order id, buyer contact, sku, quantity) of the lines these buyers were
        taken in with since a time, bar those not sold (parked, cancelled): for the limits per
        buyer (agent/screening.py)."""
        rows = await tx.fetch(
            "SELECT platform, order_id, buyer_contact, sku, quantity FROM orders"
            " WHERE buyer_contact = ANY($1::text[]) AND seen_at >= $2"
            " AND state NOT IN {line_class:not_demand}",
            list(contacts),
            since,
        )
        return [(r[0], r[1], r[2], r[3], int(r[4])) for r in rows]

    @read
    async def find_lines(self, tx: Tx, order_ref: str) -> list[OrderLine]:
        lines = await self._lines(tx, "WHERE order_id = $1 ORDER BY id", order_ref)
        # A row id is ASCII digits within 63 bits: anything else names no line.
        if not lines and order_ref.isascii() and order_ref.isdigit() and len(order_ref) < 19:
            lines = await self._lines(tx, "WHERE id = $1", int(order_ref))
        return lines

    @read
    async def delivered_lines_of(
        self, tx: Tx, platform: str, order_ids: Sequence[str]
    ) -> list[OrderLine]:
        return await self._lines(
            tx,
            "WHERE platform = $1 AND state = 'delivered' AND order_id = ANY($2::text[])",
            platform,
            list(order_ids),
        )

    async def list_lines(self, state: LineState | None, limit: int) -> list[OrderLine]:
        return await self.filter_lines(state, "", "", limit)

    @read
    async def filter_lines(
        self, tx: Tx, state: LineState | None, sku: str, platform: str, limit: int
    ) -> list[OrderLine]:
        """The newest lines, newest first, in `state`, of `sku`, on `platform` (each only
        when given: None or ""), filtered by the database rather than in a window read."""
        conditions, args = [], []
        for column, value in (
            ("state", state.value if state is not None else ""),
            ("sku", sku),
            ("platform", platform),
        ):
            if value:
                args.append(value)
                conditions.append(f"{column} = ${len(args)}")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        return await self._lines(
            tx, f"{where} ORDER BY id DESC LIMIT ${len(args) + 1}", *args, limit
        )

    @read
    async def delivered_since(self, tx: Tx, since: float) -> DeliveredSince:
        """The lines delivered since `since` (the delivered state's partial index, by
        delivered_at): the exact count and the nearest-rank p50/p99 of seen -> delivered
        latency, in one statement (ranks counted by the database, no row sent back)."""
        row = await tx.fetchrow(
            "SELECT COUNT(*), MAX(CASE WHEN n = (total + 1) / 2 THEN latency END),"
            " MAX(CASE WHEN n = (99 * total + 99) / 100 THEN latency END) FROM"
            " (SELECT delivered_at - seen_at AS latency,"
            "  ROW_NUMBER() OVER (ORDER BY delivered_at - seen_at) AS n,"
            "  COUNT(*) OVER () AS total"
            "  FROM {orders_delivered} WHERE state = 'delivered' AND delivered_at >= $1) AS d",
            since,
        )
        count, p50, p99 = (0, None, None) if row is None else (row[0], row[1], row[2])
        return DeliveredSince(
            count=int(count or 0),
            p50=None if p50 is None else max(0.0, float(p50)),
            p99=None if p99 is None else max(0.0, float(p99)),
        )

    @read
    async def events(self, tx: Tx, line_id: int) -> list[OrderEvent]:
        rows = await tx.fetch(
            "SELECT at, kind, detail FROM events WHERE order_line_id = $1 ORDER BY id", line_id
        )
        return [OrderEvent(at=r[0], kind=r[1], detail=r[2]) for r in rows]

    @read
    async def count_by_state(self, tx: Tx) -> dict[LineState, int]:
        rows = await tx.fetch("SELECT state, COUNT(*) FROM orders GROUP BY state")
        return {LineState(r[0]): r[1] for r in rows}

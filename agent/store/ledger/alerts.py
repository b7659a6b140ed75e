"""The ledger's forecast inputs, alerts with their outbox, and the buyer side. Written once.

On a shared ledger the jobs calling these run on one agent at a time (singleton()); the
alert rows are still locked while they change, so a second caller would queue, not repeat."""

from __future__ import annotations

from collections.abc import Sequence

from agent.domain import (
    AlertCondition,
    AlertMessage,
    ClosedAlert,
    LineState,
    OpenAlert,
    OrderLine,
    OutboxItem,
    refund_idempotency_key,
)
from agent.i18n import N_
from agent.phrased import phrased
from agent.store.base import StoreError
from agent.store.ledger.core import HOLDINGS, read, write
from agent.store.ledger.purchases import PurchasesLedger
from agent.store.rows import (
    LINE_COLUMNS,
    LINE_WIDTH,
    OPEN_ALERT_COLUMNS,
    line_from_row,
    plan_alerts,
)
from agent.store.tx import Bulk, Tx

OUTBOX = Bulk(
    "INSERT INTO outbox (channel, alert_key, payload, created_at) VALUES ($1, $2, $3, $4)",
    ("text", "text", "text", "float8"),
)


LINE_AND_REFUND = f"SELECT {LINE_COLUMNS}, refund_key FROM orders WHERE id = $1{{for_update}}"
SET_REFUND_KEY = "UPDATE orders SET refund_key = $1, updated_at = $2 WHERE id = $3"
# A platform call under way on these: a refund now could race a delivery or a purchase.
BUSY_FOR_REFUND = (LineState.ALLOCATED, LineState.DELIVERING, LineState.PURCHASING)


class AlertsLedger(PurchasesLedger):
    @read
    async def demand_since(self, tx: Tx, since: float) -> list[tuple[str, float, int]]:
        rows = await tx.fetch(
            "SELECT sku, AVG(seen_at), SUM(quantity) FROM {orders_by_seen} WHERE seen_at >= $1"
            " AND state NOT IN {line_class:not_demand} GROUP BY sku, {bucket}",
            since,
        )
        return [(r[0], r[1], int(r[2])) for r in rows]

    @read
    async def active_lines(self, tx: Tx, limit: int) -> list[OrderLine]:
        return await self._lines(
            tx, "WHERE state IN {line_class:active} ORDER BY id LIMIT $1", limit
        )

    @write
    async def apply_alerts(
        self,
        tx: Tx,
        active: Sequence[AlertCondition],
        channels: Sequence[str],
        now: float,
        escalate_after: float,
        max_escalations: int,
    ) -> list[AlertMessage]:
        rows = await tx.fetch(
            f"SELECT {OPEN_ALERT_COLUMNS} FROM alerts WHERE state = 'open'{{for_update}}"
        )
        plan = plan_alerts(rows, active, now, escalate_after, max_escalations)
        for cond in plan.opened:
            await tx.execute(
                "INSERT INTO alerts (key, kind, state, severity, summary, opened_at,"
                " last_sent_at, escalations) VALUES ($1, $2, 'open', $3, $4, $5, $5, 0)"
                " ON CONFLICT (key) DO UPDATE SET state = 'open', severity ="
                " excluded.severity, summary = excluded.summary, opened_at = excluded"
                ".opened_at, last_sent_at = excluded.last_sent_at, escalations = 0,"
                " resolved_at = NULL",
                cond.key,
                cond.kind,
                cond.severity,
                cond.summary,
                now,
            )
        for cond in plan.escalated:
            await tx.execute(
                "UPDATE alerts SET last_sent_at = $1, escalations = escalations + 1,"
                " summary = $2 WHERE key = $3",
                now,
                cond.summary,
                cond.key,
            )
        for cond in plan.unchanged:
            await tx.execute(
                "UPDATE alerts SET summary = $1 WHERE key = $2", cond.summary, cond.key
            )
        for key in plan.resolved:
            await tx.execute(
                "UPDATE alerts SET state = 'resolved', resolved_at = $1 WHERE key = $2", now, key
            )
            # Kept apart: the alert's row is reopened in place the next time it fires.
            await tx.execute(
                "INSERT INTO alert_history (key, kind, severity, summary, opened_at,"
                " resolved_at, escalations) SELECT key, kind, severity, summary, opened_at,"
                " resolved_at, escalations FROM alerts WHERE key = $1",
                key,
            )
        outbox = [(c, m.key, m.to_json(), now) for m in plan.messages for c in channels]
        if outbox:
            await tx.executemany(OUTBOX, outbox)
        return plan.messages

    @read
    async def open_alerts(self, tx: Tx) -> list[OpenAlert]:
        rows = await tx.fetch(
            "SELECT key, kind, severity, summary, opened_at, escalations FROM alerts"
            " WHERE state = 'open' ORDER BY opened_at"
        )
        return [OpenAlert(*r) for r in rows]

    @read
    async def closed_alerts(self, tx: Tx, limit: int) -> list[ClosedAlert]:
        rows = await tx.fetch(
            "SELECT key, kind, severity, summary, opened_at, resolved_at, escalations"
            " FROM alert_history ORDER BY resolved_at DESC, id DESC LIMIT $1",
            limit,
        )
        return [ClosedAlert(*r) for r in rows]

    @read
    async def due_outbox(self, tx: Tx, now: float, limit: int) -> list[OutboxItem]:
        rows = await tx.fetch(
            "SELECT id, channel, payload, attempts FROM outbox WHERE sent_at IS NULL"
            " AND dead_at IS NULL AND next_attempt_at <= $1 ORDER BY id LIMIT $2",
            now,
            limit,
        )
        return [OutboxItem(*r) for r in rows]

    @write
    async def outbox_done(
        self,
        tx: Tx,
        item_id: int,
        now: float,
        *,
        error: str | None = None,
        retry_at: float | None = None,
    ) -> None:
        args: tuple[float | str, ...]
        if error is None:
            sets, args = "sent_at = $1", (now,)
        elif retry_at is not None:
            sets, args = "next_attempt_at = $1, last_error = $2", (retry_at, error)
        else:
            sets, args = "dead_at = $1, last_error = $2", (now, error)
        await tx.execute(
            f"UPDATE outbox SET attempts = attempts + 1, {sets} WHERE id = ${len(args) + 1}",
            *args,
            item_id,
        )

    # --- buyer side -------------------------------------------------------------------------
    @read
    async def lines_needing_notice(self, tx: Tx, seen_before: float, limit: int) -> list[OrderLine]:
        return await self._lines(
            tx,
            "WHERE state IN {line_class:noticed} AND notice_sent_at IS NULL AND seen_at <= $1"
            " ORDER BY id LIMIT $2",
            seen_before,
            limit,
        )

    @write
    async def mark_notice_sent(self, tx: Tx, line_id: int, message: str, now: float) -> None:
        await tx.execute("UPDATE orders SET notice_sent_at = $1 WHERE id = $2", now, line_id)
        await self._event(tx, line_id, "buyer_notice", message[:200], now)

    @write
    async def begin_refund(self, tx: Tx, line_id: int, now: float) -> str | None:
        row = await tx.fetchrow(LINE_AND_REFUND, line_id)
        if row is None:
            return None
        line, existing = line_from_row(row), row[LINE_WIDTH]
        if existing:
            return str(existing)
        if line.state != LineState.BACKORDERED or await tx.fetchval(HOLDINGS, line_id):
            return None
        key = refund_idempotency_key(line.platform, line.order_id, line.line)
        await tx.execute(SET_REFUND_KEY, key, now, line_id)
        await self._event(tx, line_id, "refund_intent", f"key {key}", now)
        return key

    @write
    async def begin_merchant_refund(
        self, tx: Tx, line_id: int, reason: str, now: float
    ) -> tuple[OrderLine, str]:
        """Commits the refund key of a refund the merchant asked for (the same key when one
        is committed) and returns (line, key); keys stay bound. Refused (StoreError) for a
        closed line and for one with a delivery or a purchase under way: the call in flight
        could still hand over keys the refund would not account for."""
        row = await tx.fetchrow(LINE_AND_REFUND, line_id)
        if row is None:
            raise phrased(StoreError, N_("no order line %(line)s"), line=line_id)
        line, existing = line_from_row(row), row[LINE_WIDTH]
        if line.state in (LineState.REFUNDED, LineState.CANCELLED):
            raise phrased(
                StoreError,
                N_("order %(order)s is already %(state)s"),
                order=line.order_id,
                state=line.state,
            )
        if line.state in BUSY_FOR_REFUND:
            raise phrased(
                StoreError,
                N_(
                    "order %(order)s is %(state)s: a delivery or purchase is under way; refund it"
                    " once it is delivered or parked"
                ),
                order=line.order_id,
                state=line.state,
            )
        key = (
            str(existing)
            if existing
            else refund_idempotency_key(line.platform, line.order_id, line.line)
        )
        if not existing:
            await tx.execute(SET_REFUND_KEY, key, now, line_id)
        await self._event(tx, line_id, "refund_intent", f"key {key}; asked: {reason}", now)
        return line, key

    @write
    async def drop_refund(self, tx: Tx, line_id: int, why: str, now: float) -> None:
        """The platform definitely did not refund (it refused): the refund key cleared, so the
        line goes on as it stood (a backordered one is offered to workers again)."""
        await tx.execute(SET_REFUND_KEY, None, now, line_id)
        await self._event(tx, line_id, "refund_refused", why, now)

    @read
    async def refunds_in_flight(self, tx: Tx) -> list[tuple[OrderLine, str]]:
        rows = await tx.fetch(
            f"SELECT {LINE_COLUMNS}, refund_key FROM orders WHERE refund_key IS NOT NULL"
            " AND state = 'backordered'"
        )
        return [(line_from_row(r), r[LINE_WIDTH]) for r in rows]

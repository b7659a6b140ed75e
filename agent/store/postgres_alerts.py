"""PostgreSQL ledger: forecast inputs, alerts with their outbox, and the buyer side.

The jobs that call these run on one agent at a time (advisory locks, see singleton()); the
alert rows are still locked while they change, so a second caller would queue, not repeat."""

from __future__ import annotations

from collections.abc import Sequence

from agent.domain import (
    AlertCondition,
    AlertMessage,
    LineState,
    OpenAlert,
    OrderLine,
    OutboxItem,
    refund_idempotency_key,
)
from agent.store.postgres_base import Conn
from agent.store.postgres_purchases import PgPurchasesLedger
from agent.store.rows import (
    DEMAND_BUCKET_SECONDS,
    LINE_COLUMNS,
    LINE_WIDTH,
    OPEN_ALERT_COLUMNS,
    line_from_row,
    plan_alerts,
)

ACTIVE = "('new', 'backordered', 'purchasing', 'allocated', 'delivering')"


class PgAlertsLedger(PgPurchasesLedger):
    async def demand_since(self, since: float) -> list[tuple[str, float, int]]:
        async def run(conn: Conn) -> list[tuple[str, float, int]]:
            rows = await conn.fetch(
                f"SELECT sku, AVG(seen_at), SUM(quantity) FROM orders WHERE seen_at >= $1"
                f" AND state NOT IN ('needs_attention', 'cancelled')"
                f" GROUP BY sku, floor(seen_at / {DEMAND_BUCKET_SECONDS})",
                since,
            )
            return [(r[0], r[1], r[2]) for r in rows]

        return await self._tx(run)

    async def active_lines(self, limit: int) -> list[OrderLine]:
        async def run(conn: Conn) -> list[OrderLine]:
            rows = await conn.fetch(
                f"SELECT {LINE_COLUMNS} FROM orders WHERE state IN {ACTIVE} ORDER BY id LIMIT $1",
                limit,
            )
            return [line_from_row(r) for r in rows]

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

        async def run(conn: Conn) -> list[AlertMessage]:
            rows = await conn.fetch(
                f"SELECT {OPEN_ALERT_COLUMNS} FROM alerts WHERE state = 'open' FOR UPDATE"
            )
            plan = plan_alerts(rows, active, now, escalate_after, max_escalations)
            for cond in plan.opened:
                await conn.execute(
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
                await conn.execute(
                    "UPDATE alerts SET last_sent_at = $1, escalations = escalations + 1,"
                    " summary = $2 WHERE key = $3",
                    now,
                    cond.summary,
                    cond.key,
                )
            for cond in plan.unchanged:
                await conn.execute(
                    "UPDATE alerts SET summary = $1 WHERE key = $2", cond.summary, cond.key
                )
            for key in plan.resolved:
                await conn.execute(
                    "UPDATE alerts SET state = 'resolved', resolved_at = $1 WHERE key = $2",
                    now,
                    key,
                )
            await conn.executemany(
                "INSERT INTO outbox (channel, alert_key, payload, created_at)"
                " VALUES ($1, $2, $3, $4)",
                [(c, m.key, m.to_json(), now) for m in plan.messages for c in channels],
            )
            return plan.messages

        return await self._tx(run)

    async def open_alerts(self) -> list[OpenAlert]:
        async def run(conn: Conn) -> list[OpenAlert]:
            rows = await conn.fetch(
                "SELECT key, kind, severity, summary, opened_at, escalations FROM alerts"
                " WHERE state = 'open' ORDER BY opened_at"
            )
            return [OpenAlert(*r) for r in rows]

        return await self._tx(run)

    async def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        async def run(conn: Conn) -> list[OutboxItem]:
            rows = await conn.fetch(
                "SELECT id, channel, payload, attempts FROM outbox WHERE sent_at IS NULL"
                " AND dead_at IS NULL AND next_attempt_at <= $1 ORDER BY id LIMIT $2",
                now,
                limit,
            )
            return [OutboxItem(*r) for r in rows]

        return await self._tx(run)

    async def outbox_done(
        self, item_id: int, now: float, *, error: str | None = None, retry_at: float | None = None
    ) -> None:
        """Sent (no error), to retry at `retry_at`, or dead (error and no retry)."""

        async def run(conn: Conn) -> None:
            if error is None:
                await conn.execute(
                    "UPDATE outbox SET sent_at = $1, attempts = attempts + 1 WHERE id = $2",
                    now,
                    item_id,
                )
            elif retry_at is not None:
                await conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1,"
                    " last_error = $2 WHERE id = $3",
                    retry_at,
                    error,
                    item_id,
                )
            else:
                await conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1, dead_at = $1, last_error = $2"
                    " WHERE id = $3",
                    now,
                    error,
                    item_id,
                )

        await self._tx(run)

    # --- buyer side -------------------------------------------------------------------------
    async def lines_needing_notice(self, seen_before: float, limit: int) -> list[OrderLine]:
        async def run(conn: Conn) -> list[OrderLine]:
            rows = await conn.fetch(
                f"SELECT {LINE_COLUMNS} FROM orders WHERE state IN ('backordered', 'purchasing')"
                f" AND notice_sent_at IS NULL AND seen_at <= $1 ORDER BY id LIMIT $2",
                seen_before,
                limit,
            )
            return [line_from_row(r) for r in rows]

        return await self._tx(run)

    async def mark_notice_sent(self, line_id: int, message: str, now: float) -> None:
        async def run(conn: Conn) -> None:
            await conn.execute("UPDATE orders SET notice_sent_at = $1 WHERE id = $2", now, line_id)
            await self._event(conn, line_id, "buyer_notice", message[:200], now)

        await self._tx(run)

    async def begin_refund(self, line_id: int, now: float) -> str | None:
        """Commits the refund intent if the line still has no keys and nothing being bought."""

        async def run(conn: Conn) -> str | None:
            row = await conn.fetchrow(
                f"SELECT {LINE_COLUMNS}, refund_key FROM orders WHERE id = $1 FOR UPDATE", line_id
            )
            if row is None:
                return None
            line, existing = line_from_row(row), row[LINE_WIDTH]
            if existing:
                return str(existing)
            busy = await conn.fetchval(
                "SELECT (SELECT COUNT(*) FROM card_keys WHERE order_line_id = $1) +"
                " (SELECT COUNT(*) FROM purchases WHERE order_line_id = $1"
                "  AND state IN ('intent', 'unknown', 'processing'))",
                line_id,
            )
            if line.state != LineState.BACKORDERED or busy:
                return None
            key = refund_idempotency_key(line.platform, line.order_id, line.line)
            await conn.execute(
                "UPDATE orders SET refund_key = $1, updated_at = $2 WHERE id = $3",
                key,
                now,
                line_id,
            )
            await self._event(conn, line_id, "refund_intent", f"key {key}", now)
            return key

        return await self._tx(run)

    async def refunds_in_flight(self) -> list[tuple[OrderLine, str]]:
        async def run(conn: Conn) -> list[tuple[OrderLine, str]]:
            rows = await conn.fetch(
                f"SELECT {LINE_COLUMNS}, refund_key FROM orders WHERE refund_key IS NOT NULL"
                f" AND state = 'backordered'"
            )
            return [(line_from_row(r), r[LINE_WIDTH]) for r in rows]

        return await self._tx(run)

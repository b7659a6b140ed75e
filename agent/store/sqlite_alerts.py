"""SQLite ledger: forecast inputs, alerts with their outbox, and the buyer side."""

from __future__ import annotations

import sqlite3
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
from agent.store.rows import (
    DEMAND_BUCKET_SECONDS,
    LINE_COLUMNS,
    LINE_WIDTH,
    OPEN_ALERT_COLUMNS,
    line_from_row,
    plan_alerts,
)
from agent.store.sqlite_base import SQLiteBase


class AlertsLedger(SQLiteBase):
    async def demand_since(self, since: float) -> list[tuple[str, float, int]]:
        def run(conn: sqlite3.Connection) -> list[tuple[str, float, int]]:
            rows = conn.execute(
                # INDEXED BY: unprompted, the planner walks the (sku, state) index for the
                # GROUP BY, through every order ever taken in.
                f"SELECT sku, AVG(seen_at), SUM(quantity) FROM orders INDEXED BY orders_seen"
                f" WHERE seen_at >= ?"
                f" AND state NOT IN ('needs_attention', 'cancelled')"
                f" GROUP BY sku, CAST(seen_at / {DEMAND_BUCKET_SECONDS} AS INTEGER)",
                (since,),
            ).fetchall()
            return [(r[0], r[1], r[2]) for r in rows]

        # On the ledger thread, not the event loop: after a flash sale this reads tens of
        # thousands of orders, and SQLite does it without holding the GIL, so deliveries go
        # on meanwhile (a read needs no place in a group commit).
        return await self._call(run, self._require())

    async def active_lines(self, limit: int) -> list[OrderLine]:
        def run(conn: sqlite3.Connection) -> list[OrderLine]:
            rows = conn.execute(
                f"SELECT {LINE_COLUMNS} FROM orders WHERE state IN ('new', 'backordered',"
                " 'purchasing', 'allocated', 'delivering') ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
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

        def run(conn: sqlite3.Connection) -> list[AlertMessage]:
            rows = conn.execute(
                f"SELECT {OPEN_ALERT_COLUMNS} FROM alerts WHERE state = 'open'"
            ).fetchall()
            plan = plan_alerts(rows, active, now, escalate_after, max_escalations)
            for cond in plan.opened:
                conn.execute(
                    "INSERT INTO alerts (key, kind, state, severity, summary, opened_at,"
                    " last_sent_at, escalations) VALUES (?, ?, 'open', ?, ?, ?, ?, 0)"
                    " ON CONFLICT (key) DO UPDATE SET state = 'open', severity ="
                    " excluded.severity, summary = excluded.summary, opened_at = excluded"
                    ".opened_at, last_sent_at = excluded.last_sent_at, escalations = 0,"
                    " resolved_at = NULL",
                    (cond.key, cond.kind, cond.severity, cond.summary, now, now),
                )
            for cond in plan.escalated:
                conn.execute(
                    "UPDATE alerts SET last_sent_at = ?, escalations = escalations + 1,"
                    " summary = ? WHERE key = ?",
                    (now, cond.summary, cond.key),
                )
            for cond in plan.unchanged:
                conn.execute(
                    "UPDATE alerts SET summary = ? WHERE key = ?", (cond.summary, cond.key)
                )
            for key in plan.resolved:
                conn.execute(
                    "UPDATE alerts SET state = 'resolved', resolved_at = ? WHERE key = ?",
                    (now, key),
                )
            for message in plan.messages:
                for channel in channels:
                    conn.execute(
                        "INSERT INTO outbox (channel, alert_key, payload, created_at)"
                        " VALUES (?, ?, ?, ?)",
                        (channel, message.key, message.to_json(), now),
                    )
            return plan.messages

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
                f"SELECT {LINE_COLUMNS} FROM orders WHERE state IN ('backordered', 'purchasing')"
                " AND notice_sent_at IS NULL AND seen_at <= ? ORDER BY id LIMIT ?",
                (seen_before, limit),
            ).fetchall()
            return [line_from_row(r) for r in rows]

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
                f"SELECT {LINE_COLUMNS}, refund_key FROM orders WHERE refund_key IS NOT NULL"
                " AND state = 'backordered'"
            ).fetchall()
            return [(line_from_row(r), r[LINE_WIDTH]) for r in rows]

        return await self._tx(run)

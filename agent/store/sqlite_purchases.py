"""SQLite ledger: purchases from suppliers, and binding what they sell."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from agent.domain import (
    CardItem,
    LineState,
    OrderLine,
    Purchase,
    PurchaseState,
    purchase_merchant_ref,
)
from agent.store.base import StoreError
from agent.store.rows import PURCHASE_COLUMNS, purchase_from_row
from agent.store.sqlite_base import SQLiteBase


class PurchasesLedger(SQLiteBase):
    async def open_purchase(self, line_id: int) -> Purchase | None:
        def run(conn: sqlite3.Connection) -> Purchase | None:
            row = conn.execute(
                f"SELECT {PURCHASE_COLUMNS} FROM purchases WHERE order_line_id = ?"
                " AND state IN ('intent', 'unknown', 'processing')",
                (line_id,),
            ).fetchone()
            return None if row is None else purchase_from_row(row)

        return await self._tx(run)

    async def purchases_for(self, line_id: int) -> list[Purchase]:
        def run(conn: sqlite3.Connection) -> list[Purchase]:
            rows = conn.execute(
                f"SELECT {PURCHASE_COLUMNS} FROM purchases WHERE order_line_id = ? ORDER BY id",
                (line_id,),
            ).fetchall()
            return [purchase_from_row(r) for r in rows]

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
            f"SELECT {PURCHASE_COLUMNS} FROM purchases WHERE id = ?", (row_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"no purchase with id {row_id}")
        return purchase_from_row(row)

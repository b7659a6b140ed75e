"""PostgreSQL ledger: purchases from suppliers, and binding what they sell."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from agent.domain import (
    CardItem,
    LineState,
    OrderLine,
    Purchase,
    PurchaseState,
    purchase_merchant_ref,
)
from agent.store.base import StoreError
from agent.store.postgres_base import Conn
from agent.store.postgres_orders import PgOrdersLedger
from agent.store.rows import PURCHASE_COLUMNS, purchase_from_row

_OPEN = "('intent', 'unknown', 'processing')"


class PgPurchasesLedger(PgOrdersLedger):
    async def open_purchase(self, line_id: int) -> Purchase | None:
        async def run(conn: Conn) -> Purchase | None:
            row = await conn.fetchrow(
                f"SELECT {PURCHASE_COLUMNS} FROM purchases WHERE order_line_id = $1"
                f" AND state IN {_OPEN}",
                line_id,
            )
            return None if row is None else purchase_from_row(row)

        return await self._tx(run)

    async def purchases_for(self, line_id: int) -> list[Purchase]:
        async def run(conn: Conn) -> list[Purchase]:
            rows = await conn.fetch(
                f"SELECT {PURCHASE_COLUMNS} FROM purchases WHERE order_line_id = $1 ORDER BY id",
                line_id,
            )
            return [purchase_from_row(r) for r in rows]

        return await self._tx(run)

    async def begin_purchase(self, line_id: int, supplier: str, now: float) -> Purchase:
        async def run(conn: Conn) -> Purchase:
            line = await self._lock_line(conn, line_id, now)
            if line.state not in (LineState.NEW, LineState.BACKORDERED, LineState.PURCHASING):
                raise StoreError(f"order line {line_id} is {line.state}, not buying")
            if await self._refunding(conn, line_id):
                raise StoreError(f"order line {line_id} is being refunded, not buying")
            attempt = await conn.fetchval(
                "SELECT COUNT(*) FROM purchases WHERE order_line_id = $1 AND supplier = $2",
                line_id,
                supplier,
            )
            ref = purchase_merchant_ref(
                line.platform, line.order_id, line.line, supplier, attempt + 1
            )
            try:
                # The partial unique index refuses a second open purchase for the line.
                row = await conn.fetchrow(
                    f"INSERT INTO purchases (order_line_id, supplier, sku, quantity, merchant_ref,"
                    f" state, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'intent', $6,"
                    f" $6) RETURNING {PURCHASE_COLUMNS}",
                    line_id,
                    supplier,
                    line.sku,
                    line.quantity,
                    ref,
                    now,
                )
            except asyncpg.UniqueViolationError as exc:
                raise StoreError(f"order line {line_id} already has a purchase open") from exc
            await conn.execute(
                "UPDATE orders SET state = 'purchasing', updated_at = $1 WHERE id = $2",
                now,
                line_id,
            )
            await self._event(conn, line_id, "purchase_intent", f"{supplier} ref {ref}", now)
            return purchase_from_row(row)

        return await self._tx(run)

    async def _purchase_update(
        self,
        purchase: Purchase,
        sql: str,
        args: tuple[object, ...],
        kind: str,
        detail: str,
        now: float,
    ) -> Purchase:
        """One purchase transition plus its event on the line, under the line's lock."""

        async def run(conn: Conn) -> Purchase:
            await self._lock_line(conn, purchase.order_line_id, now)
            await conn.execute(sql, *args)
            await self._event(conn, purchase.order_line_id, kind, detail, now)
            return await self._fetch_purchase(conn, purchase.id)

        return await self._tx(run)

    async def purchase_unknown(self, purchase: Purchase, reason: str, now: float) -> Purchase:
        return await self._purchase_update(
            purchase,
            "UPDATE purchases SET state = 'unknown', unknown_since = COALESCE(unknown_since,"
            " $1), failure = $2, updated_at = $1 WHERE id = $3 AND state IN ('intent', 'unknown')",
            (now, reason, purchase.id),
            "purchase_unknown",
            f"{purchase.merchant_ref}: {reason}",
            now,
        )

    async def purchase_processing(self, purchase: Purchase, purchase_id: str, now: float) -> None:
        await self._purchase_update(
            purchase,
            f"UPDATE purchases SET state = 'processing', purchase_id = $1, updated_at = $2"
            f" WHERE id = $3 AND state IN {_OPEN}",
            (purchase_id, now, purchase.id),
            "purchase_processing",
            f"{purchase.supplier} purchase {purchase_id}",
            now,
        )

    async def purchase_failed(self, purchase: Purchase, failure: str, now: float) -> None:
        await self._purchase_update(
            purchase,
            f"UPDATE purchases SET state = 'failed', failure = $1, updated_at = $2"
            f" WHERE id = $3 AND state IN {_OPEN}",
            (failure, now, purchase.id),
            "purchase_failed",
            f"{purchase.supplier} {purchase.merchant_ref}: {failure}",
            now,
        )

    async def complete_purchase(
        self, purchase: Purchase, purchase_id: str, items: Sequence[CardItem], now: float
    ) -> OrderLine:
        """Stores the bought keys and binds them to the line in one transaction."""

        async def run(conn: Conn) -> OrderLine:
            line = await self._lock_line(conn, purchase.order_line_id, now)
            current = await self._fetch_purchase(conn, purchase.id)
            if current.state == PurchaseState.COMPLETED:
                return line
            source = f"purchase:{purchase.supplier}:{purchase.merchant_ref}"
            rows = await self._key_rows(conn, line.sku, items, source, now)
            new_ids: list[int] = []
            for row in rows:
                key_id = await conn.fetchval(
                    "INSERT INTO card_keys (sku, key_id, sealed, secret_hash, state, source,"
                    " added_at) VALUES ($1, $2, $3, $4, 'free', $5, $6)"
                    " ON CONFLICT (sku, secret_hash) DO NOTHING RETURNING id",
                    *row,
                )
                if key_id is not None:
                    new_ids.append(int(key_id))
            await conn.execute(
                "UPDATE purchases SET state = 'completed', purchase_id = $1, failure = NULL,"
                " updated_at = $2 WHERE id = $3",
                purchase_id,
                now,
                purchase.id,
            )
            await self._event(
                conn,
                line.id,
                "purchase_completed",
                f"{purchase.supplier} {purchase.merchant_ref}: {len(new_ids)} new keys",
                now,
            )
            return await self._bind_first(conn, line, new_ids, now)

        return await self._tx(run)

    async def _bind_first(
        self, conn: Conn, line: OrderLine, preferred: list[int], now: float
    ) -> OrderLine:
        """Binds the just-bought keys to the line (extras stay free), else the oldest free."""
        if line.state not in (LineState.NEW, LineState.BACKORDERED, LineState.PURCHASING):
            return line
        needed = line.quantity
        chosen = [
            r[0]
            for r in await conn.fetch(
                "SELECT id FROM card_keys WHERE state = 'free' AND id = ANY($1::bigint[])"
                " ORDER BY id LIMIT $2 FOR UPDATE",
                preferred,
                needed,
            )
        ]
        if len(chosen) < needed:
            chosen += [
                r[0]
                for r in await conn.fetch(
                    "SELECT id FROM card_keys WHERE sku = $1 AND state = 'free'"
                    " AND id != ALL($2::bigint[]) ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED",
                    line.sku,
                    chosen,
                    needed - len(chosen),
                )
            ]
        if len(chosen) < needed:
            await conn.execute(
                "UPDATE orders SET state = 'backordered', next_attempt_at = 0, updated_at = $1,"
                " lease_until = NULL WHERE id = $2",
                now,
                line.id,
            )
            await self._event(
                conn, line.id, "backordered", f"bought too few keys; need {needed}", now
            )
            return await self._fetch_line(conn, line.id)
        await self._bind(conn, line.id, chosen, 0, now)
        await self._event(
            conn, line.id, "allocated", f"keys {','.join(f'#{k}' for k in chosen)}", now
        )
        return await self._fetch_line(conn, line.id)

    @staticmethod
    async def _fetch_purchase(conn: Conn, row_id: int) -> Purchase:
        row = await conn.fetchrow(f"SELECT {PURCHASE_COLUMNS} FROM purchases WHERE id = $1", row_id)
        if row is None:
            raise StoreError(f"no purchase with id {row_id}")
        return purchase_from_row(row)

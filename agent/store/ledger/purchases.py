"""The ledger of purchases from suppliers, and binding what they sell. Written once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.domain import (
    CardItem,
    OrderLine,
    Purchase,
    PurchaseState,
    purchase_merchant_ref,
)
from agent.i18n import N_
from agent.phrased import phrased
from agent.reasons import BOUGHT_TOO_FEW, english
from agent.store.base import LedgerRefused, StoreError
from agent.store.ledger.core import read, write
from agent.store.ledger.orders import WAITING, OrdersLedger
from agent.store.rows import PURCHASE_COLUMNS, purchase_from_row
from agent.store.tx import Bulk, Tx

INSERT_KEY = Bulk(
    "INSERT INTO card_keys (sku, key_id, sealed, secret_hash, state, source, added_at,"
    " expires_at) VALUES ($1, $2, $3, $4, 'free', $5, $6, $7)"
    " ON CONFLICT (sku, secret_hash) DO NOTHING",
    ("text", "bigint", "bytea", "bytea", "text", "float8", "float8"),
)
# What moving a purchase to each of these states writes besides its state and time ($1: now,
# $2: the value the move is given).
MOVE_SETS = {
    PurchaseState.UNKNOWN: "unknown_since = COALESCE(unknown_since, $1), failure = $2",
    PurchaseState.PROCESSING: "purchase_id = $2",
    PurchaseState.FAILED: "failure = $2",
}


class PurchasesLedger(OrdersLedger):
    @read
    async def open_purchase(self, tx: Tx, line_id: int) -> Purchase | None:
        found = await self._purchases(
            tx, "WHERE order_line_id = $1 AND state IN {open_purchase}", line_id
        )
        return found[0] if found else None

    @read
    async def purchases_for(self, tx: Tx, line_id: int) -> list[Purchase]:
        return await self._purchases(tx, "WHERE order_line_id = $1 ORDER BY id", line_id)

    @write
    async def begin_purchase(self, tx: Tx, line_id: int, supplier: str, now: float) -> Purchase:
        line = await self._lock_line(tx, line_id, now)
        if line.state not in WAITING:
            raise phrased(
                StoreError,
                N_("order line %(line)s is %(state)s, not buying"),
                line=line_id,
                state=line.state,
            )
        if await self._refunding(tx, line_id):
            raise phrased(
                StoreError, N_("order line %(line)s is being refunded, not buying"), line=line_id
            )
        attempt = await tx.fetchval(
            "SELECT COUNT(*) FROM purchases WHERE order_line_id = $1 AND supplier = $2",
            line_id,
            supplier,
        )
        ref = purchase_merchant_ref(line.platform, line.order_id, line.line, supplier, attempt + 1)
        try:
            # The partial unique index refuses a second open purchase for the line.
            purchase_id = await tx.insert(
                "INSERT INTO purchases (order_line_id, supplier, sku, quantity, merchant_ref,"
                " state, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'intent', $6, $6)",
                line_id,
                supplier,
                line.sku,
                line.quantity,
                ref,
                now,
            )
        except LedgerRefused as exc:
            raise phrased(
                StoreError, N_("order line %(line)s already has a purchase open"), line=line_id
            ) from exc
        await tx.execute(
            "UPDATE orders SET state = 'purchasing', updated_at = $1 WHERE id = $2", now, line_id
        )
        await self._event(tx, line_id, "purchase_intent", f"{supplier} ref {ref}", now)
        return await self._fetch_purchase(tx, purchase_id or 0)

    @write
    async def purchase_unknown(
        self, tx: Tx, purchase: Purchase, reason: str, now: float
    ) -> Purchase:
        await self._move_purchase(tx, purchase, PurchaseState.UNKNOWN, reason, now)
        detail = f"{purchase.merchant_ref}: {reason}"
        await self._event(tx, purchase.order_line_id, "purchase_unknown", detail, now)
        return await self._fetch_purchase(tx, purchase.id)

    @write
    async def purchase_processing(
        self, tx: Tx, purchase: Purchase, purchase_id: str, now: float
    ) -> None:
        await self._move_purchase(tx, purchase, PurchaseState.PROCESSING, purchase_id, now)
        detail = f"{purchase.supplier} purchase {purchase_id}"
        await self._event(tx, purchase.order_line_id, "purchase_processing", detail, now)

    @write
    async def purchase_failed(self, tx: Tx, purchase: Purchase, failure: str, now: float) -> None:
        await self._move_purchase(tx, purchase, PurchaseState.FAILED, failure, now)
        detail = f"{purchase.supplier} {purchase.merchant_ref}: {failure}"
        await self._event(tx, purchase.order_line_id, "purchase_failed", detail, now)

    async def _move_purchase(
        self, tx: Tx, purchase: Purchase, target: PurchaseState, value: str, now: float
    ) -> None:
        """Its line locked, the purchase -> `target` where the table allows (MOVE_SETS says
        what `value` is); the caller records the event (its kind written out, for
        tests/contract/test_lifecycle.py)."""
        await self._lock_line(tx, purchase.order_line_id, now)
        await tx.execute(
            f"UPDATE purchases SET state = '{target}', {MOVE_SETS[target]}, updated_at = $1"
            f" WHERE id = $3 AND {{purchase_to:{target}}}",
            now,
            value,
            purchase.id,
        )

    @write
    async def complete_purchase(
        self, tx: Tx, purchase: Purchase, purchase_id: str, items: Sequence[CardItem], now: float
    ) -> OrderLine:
        line = await self._lock_line(tx, purchase.order_line_id, now)
        if (await self._fetch_purchase(tx, purchase.id)).state == PurchaseState.COMPLETED:
            return line
        source = f"purchase:{purchase.supplier}:{purchase.merchant_ref}"
        new_ids = []
        for row in await self._key_rows(tx, line.sku, items, source, now):
            if (key_id := await tx.insert(INSERT_KEY.sql, *row)) is not None:
                new_ids.append(key_id)
        await tx.execute(
            "UPDATE purchases SET state = 'completed', purchase_id = $1, failure = NULL,"
            " updated_at = $2 WHERE id = $3",
            purchase_id,
            now,
            purchase.id,
        )
        detail = f"{purchase.supplier} {purchase.merchant_ref}: {len(new_ids)} new keys"
        await self._event(tx, line.id, "purchase_completed", detail, now)
        return await self._bind_first(tx, line, new_ids, now)

    async def _bind_first(
        self, tx: Tx, line: OrderLine, preferred: list[int], now: float
    ) -> OrderLine:
        """Binds the just-bought keys to the line (extras stay free), else the oldest free."""
        if line.state not in WAITING:
            return line
        needed = line.quantity
        rows = await tx.fetch(
            "SELECT id FROM card_keys WHERE state = 'free' AND id = ANY($1::bigint[])"
            " ORDER BY id LIMIT $2{for_update}",
            preferred,
            needed,
        )
        chosen = [r[0] for r in rows]
        if len(chosen) < needed:
            rows = await tx.fetch(
                "SELECT id FROM card_keys WHERE sku = $1 AND state = 'free'"
                " AND id != ALL($2::bigint[]) AND (expires_at IS NULL OR expires_at > $4)"
                " ORDER BY id LIMIT $3{skip_locked}",
                line.sku,
                chosen,
                needed - len(chosen),
                now,
            )
            chosen += [r[0] for r in rows]
        if len(chosen) < needed:
            detail = english(BOUGHT_TOO_FEW, needed=needed)
            await self._backorder(tx, line.id, 0.0, None, detail, now)
            return await self._fetch_line(tx, line.id)
        await self._bind(tx, line.id, chosen, 0, f"keys {','.join(f'#{k}' for k in chosen)}", now)
        return await self._fetch_line(tx, line.id)

    @classmethod
    async def _fetch_purchase(cls, tx: Tx, row_id: int) -> Purchase:
        found = await cls._purchases(tx, "WHERE id = $1", row_id)
        if not found:
            raise phrased(StoreError, N_("no purchase with id %(id)s"), id=row_id)
        return found[0]

    @staticmethod
    async def _purchases(tx: Tx, where: str, *args: Any) -> list[Purchase]:
        """The purchases `where` (a template: `WHERE ... ORDER BY ...`) selects."""
        rows = await tx.fetch(f"SELECT {PURCHASE_COLUMNS} FROM purchases {where}", *args)
        return [purchase_from_row(r) for r in rows]

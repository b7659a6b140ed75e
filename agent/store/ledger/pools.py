"""The ledger of consignment: platform pools (Agiso's 卡种) kept topped up from the stock, the
adds that hand keys to them, sales from them, and keys given back (StockBack). Written once.

A key handed to a pool is `consigned` in the same transaction as the add intent (its
reference deterministic), so a crash anywhere leaves it consigned, never free: the add is
settled afterwards by adding the very same keys again, never other ones. A key the platform
sold is bound to the order line whose send log names it; a key the pool gave back is free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent import lifecycle
from agent.domain import CardItem, LineState
from agent.i18n import N_
from agent.phrased import phrased
from agent.pool_domain import (
    OPEN_POOL_ADD,
    ConsignedKey,
    Pool,
    PoolAdd,
    PoolAddIntent,
    PoolAddState,
    PoolLevel,
    PoolSaleRecord,
    pool_add_reference,
)
from agent.reasons import POOL_MISMATCH, english
from agent.store.base import StoreError
from agent.store.ledger.core import (
    COUNT_BOUND,
    FREE_KEYS,
    MARK_DELIVERED,
    PARK,
    LedgerCore,
    read,
    write,
)
from agent.store.rows import allocated_detail
from agent.store.tx import Bulk, Row, Tx

POOL_COLUMNS = "p.id, p.platform, p.cpc_id, p.sku"
ADD_COLUMNS = (
    "a.id, a.reference, a.state, a.quantity, a.added, a.refused, a.attempts, a.created_at, "
    + POOL_COLUMNS
)
# OPEN_POOL_ADD written out: a query naming them so may use the partial index pool_adds_open.
OPEN_ADDS = "('intent', 'unknown')"
KEY_COLUMNS = "k.id, k.sku, k.key_id, k.sealed, k.secret_hash"
POOLS = f"SELECT {POOL_COLUMNS} FROM pools p WHERE p.platform = $1"
ADDS = (
    f"SELECT {ADD_COLUMNS} FROM pool_adds a JOIN pools p ON p.id = a.pool_id WHERE p.platform = $1"
)
# Keys consigned to the pools of platform $1.
CONSIGNED = (
    " FROM card_keys k JOIN pool_adds a ON a.id = k.pool_add_id JOIN pools p ON p.id = a.pool_id"
    " WHERE k.state = 'consigned' AND p.platform = $1"
)
# A call of add $4 that did not settle it recorded (its detail $2, at $3), the add moved to
# state $1 (NULL: it stays) if it is in one of the states $5.
ADD_CALLED = (
    "UPDATE pool_adds SET state = COALESCE($1, state), attempts = attempts + 1, detail = $2,"
    " updated_at = $3 WHERE id = $4 AND state = ANY($5::text[])"
)
# Consigned keys $2 marked as being given back since $1 (NULL: not, or no longer).
RETURNING = (
    "UPDATE card_keys SET returning_since = $1 WHERE id = ANY($2::bigint[]) AND state = 'consigned'"
)
# A key the platform sold, bound to the line its send log names (a free key it sold too: it
# went to that buyer, so the agent must never hand it out).
BIND_SOLD = Bulk(
    "UPDATE card_keys SET state = 'bound', order_line_id = $1, slot = $2, bound_at = $3,"
    " returning_since = NULL WHERE id = $4 AND state IN ('consigned', 'free')",
    ("bigint", "int", "float8", "bigint"),
)


def _pool(row: Row, at: int = 0) -> Pool:
    return Pool(id=row[at], platform=row[at + 1], cpc_id=row[at + 2], sku=row[at + 3])


def _add(row: Row) -> PoolAdd:
    """A row of ADD_COLUMNS: the add's own columns in PoolAdd's order, then its pool's."""
    values = (row[0], _pool(row, 8), row[1], PoolAddState(row[2]), *row[3:8])
    return PoolAdd(*values)


class PoolsLedger(LedgerCore):
    """Consignment's ledger bodies (a part of agent.store.ledger.stock.Ledger)."""

    @write
    async def ensure_pool(self, tx: Tx, platform: str, cpc_id: str, sku: str, now: float) -> Pool:
        """The pool, recorded the first time it is named. A pool recorded for another SKU is
        refused: a pool sells one thing, and its keys are that SKU's."""
        await tx.execute(
            "INSERT INTO pools (platform, cpc_id, sku, created_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (platform, cpc_id) DO NOTHING",
            platform,
            cpc_id,
            sku,
            now,
        )
        row = await tx.fetchrow(POOLS + " AND p.cpc_id = $2", platform, cpc_id)
        assert row is not None
        pool = _pool(row)
        if pool.sku != sku:
            raise phrased(
                StoreError,
                N_(
                    "pool %(pool)s on %(platform)s holds keys of %(held)s, not %(sku)s: one pool"
                    " sells one SKU (create another pool in Agiso for it)"
                ),
                pool=cpc_id,
                platform=platform,
                held=pool.sku,
                sku=sku,
            )
        return pool

    @write
    async def begin_pool_add(
        self, tx: Tx, pool: Pool, count: int, now: float
    ) -> PoolAddIntent | None:
        rows = await tx.fetch(FREE_KEYS, pool.sku, count, now)
        if not rows:
            return None
        number = await tx.fetchval(
            "UPDATE pools SET adds = adds + 1 WHERE id = $1 RETURNING adds", pool.id
        )
        reference = pool_add_reference(pool.platform, pool.cpc_id, int(number))
        add_id = await tx.insert(
            "INSERT INTO pool_adds (pool_id, reference, state, quantity, created_at, updated_at)"
            " VALUES ($1, $2, 'intent', $3, $4, $4)",
            pool.id,
            reference,
            len(rows),
            now,
        )
        assert add_id is not None
        ids = [r[0] for r in rows]
        moved = await tx.execute(
            "UPDATE card_keys SET state = 'consigned', pool_add_id = $1"
            " WHERE id = ANY($2::bigint[]) AND state = 'free'",
            add_id,
            ids,
        )
        if moved != len(ids):  # a key taken meanwhile: nothing of this intent stands
            raise phrased(StoreError, N_("free keys changed while consigning them; try again"))
        items = await self._open_rows(tx, [(pool.sku, r[2], r[3], r[1]) for r in rows])
        add = PoolAdd(add_id, pool, reference, PoolAddState.INTENT, len(ids), None, None, 0, now)
        return PoolAddIntent(add, tuple(items), tuple(ids))

    @read
    async def open_pool_adds(self, tx: Tx, platform: str) -> list[PoolAddIntent]:
        """The platform's adds not settled yet (intent, unknown), each with the keys it still
        holds consigned (a key sold meanwhile is in the pool for sure, and never added again)."""
        rows = await tx.fetch(ADDS + f" AND a.state IN {OPEN_ADDS} ORDER BY a.id", platform)
        adds = [_add(r) for r in rows]
        if not adds:
            return []
        keys = await tx.fetch(
            f"SELECT k.pool_add_id, {KEY_COLUMNS} FROM card_keys k"
            " WHERE k.pool_add_id = ANY($1::bigint[]) AND k.state = 'consigned' ORDER BY k.id",
            [a.id for a in adds],
        )
        items = await self._open_rows(tx, [k[2:] for k in keys])
        held: dict[int, list[tuple[int, CardItem]]] = {}
        for key, item in zip(keys, items, strict=True):
            held.setdefault(key[0], []).append((key[1], item))
        return [
            PoolAddIntent(
                add,
                tuple(i for _, i in held.get(add.id, [])),
                tuple(k for k, _ in held.get(add.id, [])),
            )
            for add in adds
        ]

    @write
    async def pool_add_deferred(
        self, tx: Tx, add_id: int, reason: str, *, unclear: bool, now: float
    ) -> None:
        """The call did not settle the add: tried again later with the same keys. `unclear`:
        it may have taken effect (-> unknown); else nothing happened (the state stays)."""
        await self._add_called(tx, add_id, PoolAddState.UNKNOWN if unclear else None, reason, now)

    @write
    async def finish_pool_add(
        self, tx: Tx, add_id: int, sent: int, added: int, refused: int, first: bool, now: float
    ) -> PoolAddState:
        """The platform's answer to an add of `sent` keys. The first call of an intent: keys
        refused (AddFailCount) make it partial (which ones the answer does not say: all stay
        consigned, never delivered by the agent). A call repeating an earlier one whose
        outcome is unknown: a refusal is a key the earlier call already added."""
        row = await tx.fetchrow(
            "SELECT state, quantity FROM pool_adds WHERE id = $1{for_update}", add_id
        )
        if row is None:
            raise phrased(StoreError, N_("no pool add with id %(id)s"), id=add_id)
        if row[0] not in OPEN_POOL_ADD:
            return PoolAddState(row[0])  # settled meanwhile
        accounted = added + refused >= sent
        state = PoolAddState.ADDED
        if not accounted or (first and refused):
            state = PoolAddState.PARTIAL
        detail = f"added {added}, refused {refused} of {sent}" + ("" if first else " (again)")
        await tx.execute(
            "UPDATE pool_adds SET state = $1, added = $2, refused = $3,"
            " attempts = attempts + 1, detail = $4, updated_at = $5 WHERE id = $6",
            state.value,
            added,
            refused,
            detail,
            now,
            add_id,
        )
        return state

    @write
    async def fail_pool_add(self, tx: Tx, add_id: int, reason: str, now: float) -> bool:
        """The platform refused the intent's first call for good: nothing was added, its keys
        are free again. Only for an intent whose every call definitely did nothing (else the
        keys may be in the pool: see park_pool_add); True if it was failed."""
        if changed := await self._add_called(tx, add_id, PoolAddState.FAILED, reason, now):
            await tx.execute(
                "UPDATE card_keys SET state = 'free', pool_add_id = NULL"
                " WHERE pool_add_id = $1 AND state = 'consigned'",
                add_id,
            )
        return bool(changed)

    @write
    async def park_pool_add(self, tx: Tx, add_id: int, reason: str, now: float) -> None:
        """An add that cannot be settled (refused after an earlier call may have added its
        keys): -> partial, its keys kept consigned for a human to check in the pool."""
        await self._add_called(tx, add_id, PoolAddState.PARTIAL, reason, now)

    @staticmethod
    async def _add_called(
        tx: Tx, add_id: int, state: PoolAddState | None, reason: str, now: float
    ) -> int:
        """Records a call of the add that did not settle it (`reason`) and moves the add to
        `state` (None: it stays open as it is), from the states agent/lifecycle.py lets it
        move there from; how many adds it changed (0: settled, or failed, meanwhile)."""
        sources = OPEN_POOL_ADD if state is None else lifecycle.sources(PoolAddState, state)
        value = None if state is None else state.value
        return await tx.execute(
            ADD_CALLED, value, reason[:500], now, add_id, [s.value for s in sources]
        )

    @read
    async def pool_levels(self, tx: Tx, platform: str) -> list[PoolLevel]:
        pools = await tx.fetch(POOLS + " ORDER BY p.id", platform)
        counts = await tx.fetch(
            f"SELECT a.pool_id, COUNT(*), COUNT(k.returning_since){CONSIGNED} GROUP BY a.pool_id",
            platform,
        )
        by_pool = {r[0]: (int(r[1]), int(r[2])) for r in counts}
        return [PoolLevel(_pool(r), *by_pool.get(r[0], (0, 0))) for r in pools]

    @read
    async def consigned_counts(self, tx: Tx) -> dict[str, int]:
        """Keys consigned to platform pools per SKU (the forecast counts them as stock the
        platforms still sell; the stock sync does not: they are not the agent's to deliver)."""
        rows = await tx.fetch(
            "SELECT sku, COUNT(*) FROM card_keys WHERE state = 'consigned' GROUP BY sku"
        )
        return {r[0]: int(r[1]) for r in rows}

    @read
    async def pool_adds(self, tx: Tx, platform: str) -> list[PoolAdd]:
        """Every add to the platform's pools, oldest first (status, tests)."""
        return [_add(r) for r in await tx.fetch(ADDS + " ORDER BY a.id", platform)]

    # --- sales ---------------------------------------------------------------------------
    @write
    async def record_pool_sale(
        self, tx: Tx, line_id: int, items: Sequence[CardItem], now: float
    ) -> PoolSaleRecord:
        """The keys the platform's pool sent for the line (its send log), bound to it in one
        transaction: delivered when they are exactly its quantity of keys the ledger held
        consigned (or free); else parked with the reason (cards the ledger does not hold,
        cards it bound elsewhere or voided, too few or too many), every key that went to
        the buyer bound to the line all the same, so the agent never hands it out."""
        line = await self._lock_line(tx, line_id, now)
        if line.state == LineState.DELIVERED:
            bound = await tx.fetchval(COUNT_BOUND, line_id)
            return PoolSaleRecord(int(bound), 0, 0, 0, True)
        box = await self._fresh_keybox(tx)
        digests = [box.digest(item) for item in items]
        rows = await tx.fetch(
            "SELECT id, secret_hash, sku, state, order_line_id FROM card_keys"
            " WHERE secret_hash = ANY($1::bytea[])",
            digests,
        )
        found: dict[bytes, Any] = {}
        for row in rows:  # a key is unique across SKUs; the line's SKU first if not
            if row[2] == line.sku or bytes(row[1]) not in found:
                found[bytes(row[1])] = row
        start = await tx.fetchval(
            "SELECT COALESCE(MAX(slot) + 1, 0) FROM card_keys WHERE order_line_id = $1", line_id
        )
        bind: list[tuple[int, bytes]] = []
        already = unknown = conflicts = were_free = 0
        seen: set[bytes] = set()
        for digest in digests:
            row = found.get(digest)
            if row is None or digest in seen:
                unknown += row is None
                continue
            seen.add(digest)
            if row[3] == "bound" and row[4] == line_id:
                already += 1
            elif row[3] in ("consigned", "free") and row[2] == line.sku:
                bind.append((row[0], digest))
                were_free += row[3] == "free"
            else:
                conflicts += 1
        if bind:
            await tx.executemany(
                BIND_SOLD,
                [(line_id, int(start) + n, now, key_id) for n, (key_id, _) in enumerate(bind)],
            )
        bound = already + len(bind)
        detail = allocated_detail(bind) if bind else "keys already bound"
        if unknown == conflicts == 0 and bound == line.quantity:
            await tx.execute(MARK_DELIVERED, now, line_id)
            await self._event(tx, line_id, "delivered", f"sold from the pool: {detail}", now)
            return PoolSaleRecord(bound, 0, 0, were_free, True)
        reason = english(
            POOL_MISMATCH,
            sent=len(digests),
            ordered=line.quantity,
            bound=bound,
            unknown=unknown,
            conflicts=conflicts,
        )
        await tx.execute(PARK, reason, now, line_id)
        await self._event(tx, line_id, "parked", f"{reason}; {detail}", now)
        return PoolSaleRecord(bound, unknown, conflicts, were_free, False)

    # --- StockBack -----------------------------------------------------------------------
    @write
    async def begin_stock_back(
        self, tx: Tx, pool: Pool, count: int, now: float
    ) -> list[ConsignedKey]:
        """Marks up to `count` keys of the pool (of settled adds, the newest first: the least
        likely to be sold meanwhile) as being given back, before the calls."""
        rows = await tx.fetch(
            "SELECT id, sku, key_id, sealed, secret_hash FROM card_keys WHERE state = 'consigned'"
            " AND returning_since IS NULL AND pool_add_id IN (SELECT id FROM pool_adds"
            " WHERE pool_id = $1 AND state = 'added') ORDER BY id DESC LIMIT $2{skip_locked}",
            pool.id,
            count,
        )
        if not rows:
            return []
        await tx.execute(RETURNING, now, [r[0] for r in rows])
        items = await self._open_rows(tx, [r[1:] for r in rows])
        return [ConsignedKey(r[0], pool, item) for r, item in zip(rows, items, strict=True)]

    @read
    async def returning_keys(self, tx: Tx, platform: str) -> list[ConsignedKey]:
        rows = await tx.fetch(
            f"SELECT {KEY_COLUMNS}, {POOL_COLUMNS}{CONSIGNED} AND k.returning_since IS NOT NULL"
            " ORDER BY k.id",
            platform,
        )
        items = await self._open_rows(tx, [r[1:5] for r in rows])
        return [ConsignedKey(r[0], _pool(r, 5), i) for r, i in zip(rows, items, strict=True)]

    @write
    async def stock_back_done(self, tx: Tx, key_ids: Sequence[int], now: float) -> int:
        """The pool gave these keys back (StockBackSuccCount): free again."""
        return await tx.execute(
            "UPDATE card_keys SET state = 'free', pool_add_id = NULL, returning_since = NULL"
            " WHERE id = ANY($1::bigint[]) AND state = 'consigned'"
            " AND returning_since IS NOT NULL",
            list(key_ids),
        )

    @write
    async def keep_consigned(self, tx: Tx, key_ids: Sequence[int], now: float) -> int:
        """A StockBack settled the other way: the pool did not give the key back (sold, its
        sale not recorded yet), or the key was added to it again. Consigned, as before."""
        return await tx.execute(RETURNING, None, list(key_ids))

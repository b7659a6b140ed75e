"""PostgreSQL implementation of the Store port, for several agents sharing one stock.

Same contract as SQLiteStore (tests/test_store_contract.py runs both). Each call is one
transaction at READ COMMITTED; order rows are locked before they change, free keys are taken
FOR UPDATE SKIP LOCKED, and leases (claimed_by, lease_until) keep two agents off one line.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from agent.domain import CardItem, ImportReport, KeyState, StockCount, StockPosition
from agent.store.base import ProgressCallback, StoreError
from agent.store.imports import Sorted, sort_known
from agent.store.postgres_alerts import PgAlertsLedger
from agent.store.postgres_base import Conn
from agent.store.rows import IMPORT_BATCH


class PostgresStore(PgAlertsLedger):
    # --- stock ------------------------------------------------------------------------------
    async def import_keys(
        self,
        sku: str,
        items: Iterable[CardItem],
        source: str,
        now: float,
        progress: ProgressCallback | None = None,
    ) -> ImportReport:
        # Batches of their own transactions keep the agents' writes flowing during a big
        # import; an interrupted import is simply run again (duplicates are skipped).
        report = ImportReport()
        seen = 0
        iterator = iter(items)
        while batch := list(itertools.islice(iterator, IMPORT_BATCH)):

            async def insert(conn: Conn, batch: list[CardItem] = batch) -> Sorted:
                rows = await self._key_rows(conn, sku, batch, source, now)
                known = await conn.fetch(
                    "SELECT secret_hash, sku, state FROM card_keys"
                    " WHERE secret_hash = ANY($1::bytea[]) ORDER BY state = 'bound'",
                    [r[3] for r in rows],
                )  # bound rows last: they win
                sorted_rows = sort_known(sku, rows, {bytes(r[0]): (r[1], r[2]) for r in known})
                if not sorted_rows.fresh:
                    return sorted_rows
                columns = list(zip(*sorted_rows.fresh, strict=True))
                inserted = await conn.fetchval(
                    "WITH added AS (INSERT INTO card_keys (sku, key_id, sealed, secret_hash,"
                    " state, source, added_at) SELECT *, 'free', $5, $6 FROM unnest($1::text[],"
                    " $2::bigint[], $3::bytea[], $4::bytea[])"
                    " ON CONFLICT (sku, secret_hash) DO NOTHING RETURNING 1)"
                    " SELECT COUNT(*) FROM added",
                    list(columns[0]),
                    list(columns[1]),
                    list(columns[2]),
                    list(columns[3]),
                    source,
                    now,
                )
                sorted_rows.added = int(inserted)
                return sorted_rows

            report = (await self._tx(insert)).add_to(report)
            seen += len(batch)
            if progress is not None:
                progress(seen)
        return report

    async def void_free_keys(self, sku: str, count: int | None, reason: str, now: float) -> int:
        if not reason.strip():
            raise StoreError("a reason is required to void keys")

        async def run(conn: Conn) -> int:
            status = await conn.execute(
                "UPDATE card_keys SET state = 'void', void_reason = $1 WHERE id IN"
                " (SELECT id FROM card_keys WHERE sku = $2 AND state = 'free' ORDER BY id"
                "  LIMIT $3 FOR UPDATE SKIP LOCKED)",
                reason,
                sku,
                count,
            )
            return int(status.split()[-1])

        return await self._tx(run)

    async def stock_counts(self) -> list[StockCount]:
        async def run(conn: Conn) -> list[StockCount]:
            rows = await conn.fetch(
                "SELECT sku, COUNT(*) FILTER (WHERE state = 'free'), COUNT(*) FILTER"
                " (WHERE state = 'bound'), COUNT(*) FILTER (WHERE state = 'void')"
                " FROM card_keys GROUP BY sku ORDER BY sku"
            )
            return [StockCount(sku=r[0], free=r[1], bound=r[2], void=r[3]) for r in rows]

        return await self._tx(run)

    async def free_counts(self) -> dict[str, int]:
        async def run(conn: Conn) -> dict[str, int]:
            rows = await conn.fetch(
                "SELECT sku, COUNT(*) FROM card_keys WHERE state = 'free' GROUP BY sku"
            )
            return {r[0]: r[1] for r in rows}

        return await self._tx(run)

    async def stock_position(self, bought_since: float | None) -> StockPosition:
        async def run(conn: Conn) -> StockPosition:
            # Read committed: each statement sees its own moment, so the order matters (see
            # the port): a line binding keys in between is counted twice, never missed.
            waiting = await conn.fetch(
                "SELECT sku, SUM(quantity) FROM orders"
                " WHERE state IN ('new', 'backordered', 'purchasing') GROUP BY sku"
            )
            free = await conn.fetch(
                "SELECT sku, COUNT(*) FROM card_keys WHERE state = 'free' GROUP BY sku"
            )
            bought = []
            if bought_since is not None:
                bought = await conn.fetch(
                    "SELECT supplier, sku, SUM(quantity) FROM purchases"
                    " WHERE state != 'failed' AND updated_at >= $1 GROUP BY supplier, sku",
                    bought_since,
                )
            return StockPosition(
                free={r[0]: r[1] for r in free},
                waiting={r[0]: int(r[1]) for r in waiting},
                bought={(r[0], r[1]): int(r[2]) for r in bought},
            )

        return await self._tx(run)

    async def bound_items(self, line_id: int) -> tuple[CardItem, ...]:
        async def run(conn: Conn) -> tuple[CardItem, ...]:
            rows = await conn.fetch(
                "SELECT sku, key_id, sealed, secret_hash FROM card_keys WHERE order_line_id = $1"
                " ORDER BY slot",
                line_id,
            )
            return tuple(await self._open_rows(conn, rows))

        return await self._tx(run)

    async def export_keys(self, sku: str, state: KeyState) -> list[CardItem]:
        """Decrypted keys, for `kami-agent stock export` only."""

        async def run(conn: Conn) -> list[CardItem]:
            rows = await conn.fetch(
                "SELECT sku, key_id, sealed, secret_hash FROM card_keys WHERE sku = $1"
                " AND state = $2"
                " ORDER BY id",
                sku,
                state.value,
            )
            return await self._open_rows(conn, rows)

        return await self._tx(run)

    async def rotate_data_key(self, now: float, batch: int = 10_000) -> tuple[int, int]:
        """Seals every card key with a fresh data key; returns (new key id, rows moved)."""

        async def start(conn: Conn) -> int:
            key_id, key = await self._new_key(conn, "data", now)
            # Retire the others now: agents seal with the newest unretired key from here on.
            await conn.execute(
                "UPDATE data_keys SET retired_at = $1 WHERE purpose = 'data' AND id != $2"
                " AND retired_at IS NULL",
                now,
                key_id,
            )
            self.keybox.add_data_key(key_id, key)
            self.keybox.current = key_id
            return key_id

        new_id = await self._tx(start)

        async def move(conn: Conn) -> int:
            rows = await conn.fetch(
                "SELECT id, sku, key_id, sealed, secret_hash FROM card_keys WHERE key_id != $1"
                " LIMIT $2"
                " FOR UPDATE",
                new_id,
                batch,
            )
            items = await self._open_rows(conn, [r[1:] for r in rows])
            for row, item in zip(rows, items, strict=True):
                _, sealed = self.keybox.seal(row[1], item, new_id)
                await conn.execute(
                    "UPDATE card_keys SET key_id = $1, sealed = $2 WHERE id = $3",
                    new_id,
                    sealed,
                    row[0],
                )
            return len(rows)

        moved = 0
        while count := await self._tx(move):
            moved += count
        return new_id, moved


__all__ = ["PostgresStore"]

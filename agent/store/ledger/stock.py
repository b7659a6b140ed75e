"""The ledger of card key stock: import, void, counts, export, key rotation and re-sealing,
and the ledger's id. Written once; `Ledger` puts every ledger module together."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any

from agent.domain import CardItem, ImportReport, KeyState, StockCount, StockPosition
from agent.i18n import N_
from agent.logs import get_logger
from agent.phrased import phrased
from agent.store import identity
from agent.store.base import ProgressCallback, StoreError
from agent.store.imports import Sorted, sort_known
from agent.store.ledger.alerts import AlertsLedger
from agent.store.ledger.core import LINE_KEYS, STORED_ID, read, write
from agent.store.ledger.pools import PoolsLedger
from agent.store.ledger.purchases import INSERT_KEY
from agent.store.rows import IMPORT_BATCH
from agent.store.tx import Bulk, Tx

log = get_logger("kami.store")
RESEAL = Bulk(
    "UPDATE card_keys SET key_id = $1, sealed = $2, sku_bound_seal = NULL WHERE id = $3",
    ("bigint", "bytea", "bigint"),
)
RESEAL_BATCH = 5_000
NO_LIMIT = 2**62


class Ledger(AlertsLedger, PoolsLedger):
    async def import_keys(
        self,
        sku: str,
        items: Iterable[CardItem],
        source: str,
        now: float,
        progress: ProgressCallback | None = None,
    ) -> ImportReport:
        report = ImportReport()
        seen = 0
        iterator = iter(items)
        while batch := list(itertools.islice(iterator, IMPORT_BATCH)):

            async def insert(tx: Tx, batch: list[CardItem] = batch) -> Sorted:
                rows = await self._key_rows(tx, sku, batch, source, now)
                hashes = [r[3] for r in rows]
                known: dict[bytes, tuple[str, str]] = {}
                for row in await tx.fetch(
                    "SELECT secret_hash, sku, state FROM card_keys"
                    " WHERE secret_hash = ANY($1::bytea[])",
                    hashes,
                ):
                    if known.get(bytes(row[0]), ("", ""))[1] != "bound":  # bound wins
                        known[bytes(row[0])] = (row[1], row[2])
                # Let out by this ledger before a restore took it back (bound_journal.py).
                for row in await tx.fetch(
                    "SELECT secret_hash FROM bound_history WHERE secret_hash = ANY($1::bytea[])",
                    hashes,
                ):
                    known.setdefault(bytes(row[0]), ("", "bound"))
                found = sort_known(sku, rows, known)
                if found.fresh:
                    found.added = await tx.executemany(INSERT_KEY, found.fresh)
                return found

            report = (await self._write_alone(insert)).add_to(report)
            seen += len(batch)
            if progress is not None:
                progress(seen)
        return report

    @write
    async def void_free_keys(
        self, tx: Tx, sku: str, count: int | None, reason: str, now: float
    ) -> int:
        if not reason.strip():
            raise phrased(StoreError, N_("a reason is required to void keys"))
        return await tx.execute(
            "UPDATE card_keys SET state = 'void', void_reason = $1 WHERE id IN"
            " (SELECT id FROM card_keys WHERE sku = $2 AND state = 'free' ORDER BY id"
            "  LIMIT $3{skip_locked})",
            reason,
            sku,
            NO_LIMIT if count is None else count,
        )

    @write
    async def unvoid_keys(
        self, tx: Tx, sku: str, reason: str, count: int | None, now: float
    ) -> int:
        """Returns keys voided by mistake to stock: void keys of the SKU voided with exactly
        `reason` (all, or the `count` oldest), never a key that was ever bound to an order (a
        key replaced on a delivered order stays void; the database refuses it too)."""
        if not reason.strip():
            raise phrased(StoreError, N_("name the reason the keys were voided with"))
        if count is not None and count < 1:
            raise phrased(
                StoreError,
                N_("a count of keys to return must be at least 1, got %(count)s"),
                count=count,
            )
        return await tx.execute(
            "UPDATE card_keys SET state = 'free', void_reason = NULL WHERE id IN"
            " (SELECT id FROM card_keys WHERE sku = $1 AND state = 'void' AND void_reason = $2"
            "  AND bound_at IS NULL AND was_bound_to IS NULL ORDER BY id LIMIT $3{skip_locked})",
            sku,
            reason,
            NO_LIMIT if count is None else count,
        )

    @read
    async def stock_counts(self, tx: Tx) -> list[StockCount]:
        rows = await tx.fetch(
            "SELECT sku, COUNT(*) FILTER (WHERE state = 'free'), COUNT(*) FILTER"
            " (WHERE state = 'bound'), COUNT(*) FILTER (WHERE state = 'void')"
            " FROM card_keys GROUP BY sku ORDER BY sku"
        )
        expired = await self._expired_counts(tx, time.time())
        return [
            StockCount(
                sku=r[0],
                free=r[1] - expired.get(r[0], 0),
                bound=r[2],
                void=r[3],
                expired=expired.get(r[0], 0),
            )
            for r in rows
        ]

    @read
    async def free_counts(self, tx: Tx) -> dict[str, int]:
        """Free keys per SKU that may be sold, counted from the free keys' index (less those
        past their expiry, from theirs), not the whole key table."""
        return await self._sellable_counts(tx, time.time())

    @read
    async def stock_position(self, tx: Tx, bought_since: float | None) -> StockPosition:
        """Free keys, units of lines waiting for keys, units bought (see the port): read in
        this order, so a line taking keys meanwhile is counted twice, never missed."""
        waiting = await tx.fetch(
            "SELECT sku, SUM(quantity) FROM orders WHERE state IN {line_class:waiting} GROUP BY sku"
        )
        free = await self._sellable_counts(tx, time.time())
        bought: list[Any] = []
        if bought_since is not None:
            bought = await tx.fetch(
                "SELECT supplier, sku, SUM(quantity) FROM purchases"
                " WHERE state != 'failed' AND updated_at >= $1 GROUP BY supplier, sku",
                bought_since,
            )
        return StockPosition(
            free=free,
            waiting={r[0]: int(r[1]) for r in waiting},
            bought={(r[0], r[1]): int(r[2]) for r in bought},
        )

    @read
    async def bound_items(self, tx: Tx, line_id: int) -> tuple[CardItem, ...]:
        rows = await tx.fetch(LINE_KEYS, line_id)
        return tuple(await self._open_rows(tx, [r[1:] for r in rows]))

    @read
    async def export_keys(self, tx: Tx, sku: str, state: KeyState) -> list[CardItem]:
        rows = await tx.fetch(
            "SELECT sku, key_id, sealed, secret_hash FROM card_keys WHERE sku = $1"
            " AND state = $2 ORDER BY id",
            sku,
            state.value,
        )
        return await self._open_rows(tx, rows)

    async def rotate_data_key(self, now: float, batch: int = 10_000) -> tuple[int, int]:
        new_id = await self._start_rotation(now)
        moved = 0
        while count := await self._reseal(new_id, batch):
            moved += count
        return new_id, moved

    @write
    async def _start_rotation(self, tx: Tx, now: float) -> int:
        key_id, key = await self._new_key(tx, "data", now)
        # Retired now: agents seal with the newest unretired key from here on (retired
        # keys stay loaded to open what is not resealed yet).
        await tx.execute(
            "UPDATE data_keys SET retired_at = $1 WHERE purpose = 'data' AND id != $2"
            " AND retired_at IS NULL",
            now,
            key_id,
        )
        self.keybox.add_data_key(key_id, key)
        self.keybox.current = key_id
        return key_id

    @write
    async def _reseal(self, tx: Tx, new_id: int, batch: int) -> int:
        rows = await tx.fetch(
            "SELECT id, sku, key_id, sealed, secret_hash FROM card_keys WHERE key_id != $1"
            " LIMIT $2{for_update}",
            new_id,
            batch,
        )
        items = await self._open_rows(tx, [r[1:] for r in rows])
        sealed = [
            self.keybox.seal(r[1], item, new_id)[1] for r, item in zip(rows, items, strict=True)
        ]
        await tx.executemany(RESEAL, [(new_id, s, r[0]) for r, s in zip(rows, sealed, strict=True)])
        return len(rows)

    async def _reseal_sku_bound(self) -> None:
        """Re-seals rows sealed before rows were bound in (migration 0004/0006), batch by
        batch: an interrupted run goes on at the next open; agents opening together share
        the work (rows another is resealing are skipped)."""
        resealed = 0
        while count := await self._reseal_sku_bound_batch():
            resealed += count
        if resealed:
            log.info("card_keys_resealed", rows=resealed, bound="sku and row")

    @write
    async def _reseal_sku_bound_batch(self, tx: Tx) -> int:
        rows = await tx.fetch(
            "SELECT id, sku, key_id, sealed FROM card_keys WHERE sku_bound_seal IS NOT NULL"
            " ORDER BY id LIMIT $1{skip_locked}",
            RESEAL_BATCH,
        )
        box = await self._box_for(tx, [r[2] for r in rows])
        resealed: list[Sequence[Any]] = []
        for row_id, sku, key_id, sealed in rows:
            item = box.open_sku_bound(sku, key_id, sealed)
            resealed.append((key_id, box.seal(sku, item, key_id)[1], row_id))
        await tx.executemany(RESEAL, resealed)
        return len(rows)

    async def _ledger_id(self, tx: Tx, give: bool) -> tuple[str | None, bool]:
        """The id stored in the ledger, given first (`give`) if it has none; and whether it
        was given now."""
        await self._lock_table(tx, identity.META_TABLE)
        stored = await tx.fetchval(STORED_ID)
        if stored is not None or not give:
            return (None if stored is None else str(stored)), False
        ledger_id = identity.new_ledger_id()
        await tx.execute(
            f"INSERT INTO {identity.META_TABLE} (key, value) VALUES ('ledger_id', $1)", ledger_id
        )
        return ledger_id, True

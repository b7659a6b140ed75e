"""SQLite ledger: card key stock — import, void, counts, export and key rotation."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterable
from typing import Any

from agent.domain import (
    CardItem,
    ImportReport,
    KeyState,
    StockCount,
    StockPosition,
)
from agent.store.base import ProgressCallback, StoreError
from agent.store.imports import Sorted, sort_known
from agent.store.rows import IMPORT_BATCH
from agent.store.sqlite_base import SQLiteBase


class StockLedger(SQLiteBase):
    async def rotate_data_key(self, now: float, batch: int = 10_000) -> tuple[int, int]:
        """Seals every card key with a fresh data key; returns (new key id, rows moved)."""

        def start(conn: sqlite3.Connection) -> int:
            key_id, key = self._new_key(conn, "data", now)
            self.keybox.add_data_key(key_id, key)
            self.keybox.current = key_id
            return key_id

        new_id = await self._tx(start)

        def move(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT id, sku, key_id, sealed, secret_hash FROM card_keys WHERE key_id != ?"
                " LIMIT ?",
                (new_id, batch),
            ).fetchall()
            for row_id, sku, key_id, sealed, secret_hash in rows:
                item = self.keybox.open(sku, key_id, sealed, secret_hash)
                conn.execute(
                    "UPDATE card_keys SET key_id = ?, sealed = ? WHERE id = ?",
                    (*self.keybox.seal(sku, item, new_id), row_id),
                )
            return len(rows)

        moved = 0
        while count := await self._tx(move):
            moved += count

        def retire(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE data_keys SET retired_at = ? WHERE purpose = 'data' AND id != ?"
                " AND retired_at IS NULL",
                (now, new_id),
            )

        await self._tx(retire)
        return new_id, moved

    async def export_keys(self, sku: str, state: KeyState) -> list[CardItem]:
        """Decrypted keys, for `kami-agent stock export` only."""

        def run(conn: sqlite3.Connection) -> list[CardItem]:
            rows = conn.execute(
                "SELECT sku, key_id, sealed, secret_hash FROM card_keys WHERE sku = ?"
                " AND state = ? ORDER BY id",
                (sku, state.value),
            ).fetchall()
            return self._open_rows(rows)

        return await self._tx(run)

    async def import_keys(
        self,
        sku: str,
        items: Iterable[CardItem],
        source: str,
        now: float,
        progress: ProgressCallback | None = None,
    ) -> ImportReport:
        return await self._call(self._import_keys, sku, items, source, now, progress)

    def _import_keys(
        self,
        sku: str,
        items: Iterable[CardItem],
        source: str,
        now: float,
        progress: ProgressCallback | None,
    ) -> ImportReport:
        # Batches of their own transactions keep the daemon's writes flowing during a big
        # import; an interrupted import is simply run again (duplicates are skipped).
        report = ImportReport()
        seen = 0
        iterator = iter(items)
        while batch := list(itertools.islice(iterator, IMPORT_BATCH)):
            rows = [self._key_row(sku, item, source, now) for item in batch]

            def insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]] = rows) -> Sorted:
                sorted_rows = sort_known(sku, rows, known_keys(conn, [r[3] for r in rows]))
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO card_keys (sku, key_id, sealed, secret_hash, state,"
                    " source, added_at) VALUES (?, ?, ?, ?, 'free', ?, ?)",
                    sorted_rows.fresh,
                )
                sorted_rows.added = conn.total_changes - before
                return sorted_rows

            done = self._in_tx(insert)
            report = done.add_to(report)
            seen += len(batch)
            if progress is not None:
                progress(seen)
        return report

    async def void_free_keys(self, sku: str, count: int | None, reason: str, now: float) -> int:
        if not reason.strip():
            raise StoreError("a reason is required to void keys")

        def run(conn: sqlite3.Connection) -> int:
            limit = -1 if count is None else count
            cur = conn.execute(
                "UPDATE card_keys SET state = 'void', void_reason = ? WHERE id IN"
                " (SELECT id FROM card_keys WHERE sku = ? AND state = 'free' ORDER BY id LIMIT ?)",
                (reason, sku, limit),
            )
            return cur.rowcount

        return await self._tx(run)

    async def stock_counts(self) -> list[StockCount]:
        def run(conn: sqlite3.Connection) -> list[StockCount]:
            rows = conn.execute(
                "SELECT sku, SUM(state = 'free'), SUM(state = 'bound'), SUM(state = 'void')"
                " FROM card_keys GROUP BY sku ORDER BY sku"
            ).fetchall()
            return [StockCount(sku=r[0], free=r[1], bound=r[2], void=r[3]) for r in rows]

        return await self._tx(run)

    async def free_counts(self) -> dict[str, int]:
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT sku, COUNT(*) FROM card_keys WHERE state = 'free' GROUP BY sku"
            ).fetchall()
            return {r[0]: r[1] for r in rows}

        return await self._tx(run)

    async def stock_position(self, bought_since: float | None) -> StockPosition:
        def run(conn: sqlite3.Connection) -> StockPosition:
            # One transaction: the three counts are of the same moment.
            waiting = conn.execute(
                "SELECT sku, SUM(quantity) FROM orders"
                " WHERE state IN ('new', 'backordered', 'purchasing') GROUP BY sku"
            ).fetchall()
            free = conn.execute(
                "SELECT sku, COUNT(*) FROM card_keys WHERE state = 'free' GROUP BY sku"
            ).fetchall()
            bought = []
            if bought_since is not None:
                bought = conn.execute(
                    "SELECT supplier, sku, SUM(quantity) FROM purchases"
                    " WHERE state != 'failed' AND updated_at >= ? GROUP BY supplier, sku",
                    (bought_since,),
                ).fetchall()
            return StockPosition(
                free={r[0]: r[1] for r in free},
                waiting={r[0]: r[1] for r in waiting},
                bought={(r[0], r[1]): r[2] for r in bought},
            )

        return await self._tx(run)

    async def bound_items(self, line_id: int) -> tuple[CardItem, ...]:
        def run(conn: sqlite3.Connection) -> tuple[CardItem, ...]:
            rows = conn.execute(
                "SELECT sku, key_id, sealed, secret_hash FROM card_keys WHERE order_line_id = ?"
                " ORDER BY slot",
                (line_id,),
            ).fetchall()
            return tuple(self._open_rows(rows))

        return await self._tx(run)


def known_keys(conn: sqlite3.Connection, hashes: list[bytes]) -> dict[bytes, tuple[str, str]]:
    """secret hash -> (sku, state) of the keys among `hashes` the ledger holds, any SKU."""
    known: dict[bytes, tuple[str, str]] = {}
    for start in range(0, len(hashes), 5_000):
        chunk = hashes[start : start + 5_000]
        for secret_hash, key_sku, state in conn.execute(
            "SELECT secret_hash, sku, state FROM card_keys WHERE secret_hash IN"
            f" ({','.join('?' * len(chunk))})",
            chunk,
        ):
            if known.get(bytes(secret_hash), ("", ""))[1] != "bound":
                known[bytes(secret_hash)] = (key_sku, state)
    return known

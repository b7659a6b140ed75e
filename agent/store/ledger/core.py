"""What every ledger body stands on: the engine's hooks, the decorators that run a body in a
write or a read transaction, the sealing keys, and the rows the ledger modules share.

An engine (agent/store/sqlite.py, postgres.py) implements the hooks; the bodies in this
package are written once over `Tx` (agent/store/tx.py) and never name a database.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from agent.domain import CardItem, LineState, OrderLine, PlatformOrder, RejectedOrder
from agent.i18n import N_
from agent.keybox import KEY_BYTES, KeyBox, unwrap, wrap
from agent.phrased import phrased
from agent.store import identity
from agent.store.base import StoreError
from agent.store.rows import LINE_COLUMNS, line_from_row
from agent.store.tx import Bulk, Row, Tx

T = TypeVar("T")
P = ParamSpec("P")
C = TypeVar("C", bound="LedgerCore")
Body = Callable[[Tx], Awaitable[T]]

EVENT = Bulk(
    "INSERT INTO events (order_line_id, at, kind, detail) VALUES ($1, $2, $3, $4)",
    ("bigint", "float8", "text", "text"),
)
FETCH_LINE = f"SELECT {LINE_COLUMNS} FROM orders WHERE id = $1"
# $2 free keys of SKU $1, oldest first, locked (skipping keys another agent is taking), as
# (id, secret_hash, key_id, sealed); a key past its expiry ($3: now) is never handed out.
FREE_KEYS = (
    "SELECT id, secret_hash, key_id, sealed FROM card_keys WHERE sku = $1 AND state = 'free'"
    " AND (expires_at IS NULL OR expires_at > $3) ORDER BY id LIMIT $2{skip_locked}"
)
KEYS = "SELECT id, purpose, wrapped, retired_at FROM data_keys ORDER BY id"
STORED_ID = f"SELECT value FROM {identity.META_TABLE} WHERE key = 'ledger_id'"
COUNT_BOUND = "SELECT COUNT(*) FROM card_keys WHERE order_line_id = $1"
# The keys bound to line $1, in slot order: (id, then what _open_rows opens).
LINE_KEYS = (
    "SELECT id, sku, key_id, sealed, secret_hash FROM card_keys WHERE order_line_id = $1"
    " ORDER BY slot"
)
# Free keys (locked by the transaction) bound to a line's slots, one row each.
BIND = Bulk(
    "UPDATE card_keys SET state = 'bound', order_line_id = $1, slot = $2, bound_at = $3"
    " WHERE id = $4 AND state = 'free'",
    ("bigint", "int", "float8", "bigint"),
)
PARK = (
    "UPDATE orders SET state = 'needs_attention', reason = $1, updated_at = $2{release}"
    " WHERE id = $3"
)
DELIVERED = (
    "UPDATE orders SET state = 'delivered', delivered_at = $1, ambiguous = 0, reason = NULL,"
    " replaces = NULL, updated_at = $1"
)
MARK_DELIVERED = DELIVERED + "{release} WHERE id = $2"
# What line $1 holds: keys bound to it and purchases open for it.
HOLDINGS = (
    "SELECT (SELECT COUNT(*) FROM card_keys WHERE order_line_id = $1) +"
    " (SELECT COUNT(*) FROM purchases WHERE order_line_id = $1 AND state IN {open_purchase})"
)


def write(
    body: Callable[Concatenate[C, Tx, P], Awaitable[T]],
) -> Callable[Concatenate[C, P], Coroutine[Any, Any, T]]:
    """The method runs its body in one write transaction: durable when it returns, nothing
    of it when it raises."""

    @functools.wraps(body)
    async def call(self: C, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._write(lambda tx: body(self, tx, *args, **kwargs))

    return call


def read(
    body: Callable[Concatenate[C, Tx, P], Awaitable[T]],
) -> Callable[Concatenate[C, P], Coroutine[Any, Any, T]]:
    """The method runs its body in one read transaction, which never takes the write lock:
    one moment's view of the ledger, while writers go on."""

    @functools.wraps(body)
    async def call(self: C, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._read(lambda tx: body(self, tx, *args, **kwargs))

    return call


class LedgerCore:
    """The engine's hooks (each engine implements them) and what the bodies share."""

    _keybox: KeyBox | None
    _master_key: bytes
    # Appended to the details of intake and delivery events: which agent did it.
    _by: str = ""
    # What the driver raises for a value it cannot store (agent/store/set_aside.py).
    _data_errors: tuple[type[BaseException], ...] = ()

    # --- the engine's hooks ------------------------------------------------------------------
    async def _write(self, body: Body[T]) -> T:
        """Runs body(tx) in a write transaction."""
        raise NotImplementedError

    async def _read(self, body: Body[T]) -> T:
        """Runs body(tx) in a read transaction (no write lock)."""
        raise NotImplementedError

    async def _write_alone(self, body: Body[T]) -> T:
        """A long write (an import batch): in a transaction of its own, off the event loop
        where the engine runs statements on it."""
        return await self._write(body)

    async def _lock_line(self, tx: Tx, line_id: int, now: float) -> OrderLine:
        """The line, locked for this transaction (and leased to this agent, if shared)."""
        return await self._fetch_line(tx, line_id)

    async def _lock_line_in(
        self, tx: Tx, line_id: int, now: float, state: LineState, refusal: str
    ) -> OrderLine:
        """The line, locked, if it is in `state`; else StoreError saying `refusal` (a msgid
        with %(order)s and %(state)s), with nothing changed."""
        line = await self._lock_line(tx, line_id, now)
        if line.state != state:
            raise phrased(StoreError, refusal, order=line.order_id, state=line.state)
        return line

    async def _lease(self, tx: Tx, line_ids: Sequence[int], now: float) -> None:
        """Leases lines this transaction locked to this agent (a shared ledger's hook)."""

    async def _lock_table(self, tx: Tx, table: str) -> None:
        """Locks a table against other agents' writes for this transaction."""

    def _intake_order(
        self, orders: Sequence[PlatformOrder | RejectedOrder]
    ) -> Sequence[PlatformOrder | RejectedOrder]:
        """The order a page's orders are taken in (a shared ledger: one for every agent)."""
        return orders

    # --- rows shared by the ledger modules ------------------------------------------------
    @staticmethod
    async def _fetch_line(tx: Tx, line_id: int) -> OrderLine:
        row = await tx.fetchrow(FETCH_LINE, line_id)
        if row is None:
            raise phrased(StoreError, N_("no order line with id %(line)s"), line=line_id)
        return line_from_row(row)

    @staticmethod
    async def _event(tx: Tx, line_id: int, kind: str, detail: str, now: float) -> None:
        await tx.execute(EVENT.sql, line_id, now, kind, detail)

    @staticmethod
    async def _events(tx: Tx, events: Sequence[tuple[int, str, str]], now: float) -> None:
        """(line id, kind, detail) events, in order."""
        if events:
            await tx.executemany(EVENT, [(e[0], now, e[1], e[2]) for e in events])

    @staticmethod
    async def _refunding(tx: Tx, line_id: int) -> bool:
        key = await tx.fetchval("SELECT refund_key FROM orders WHERE id = $1", line_id)
        return key is not None

    # --- the keys that seal card keys -----------------------------------------------------
    @property
    def keybox(self) -> KeyBox:
        if self._keybox is None:
            raise phrased(StoreError, N_("store is not open"))
        return self._keybox

    async def _load_keys(self, tx: Tx) -> KeyBox:
        # Retired data keys are loaded too: another agent (or an interrupted rotation) may
        # have sealed with one just before a rotation retired it.
        rows = await tx.fetch(KEYS)
        if not rows:  # a new ledger: one hash key for its lifetime, a first data key
            await self._lock_table(tx, "data_keys")
            rows = await tx.fetch(KEYS)
            if not rows:
                for purpose in ("hash", "data"):
                    await self._new_key(tx, purpose, time.time())
                rows = await tx.fetch(KEYS)
        keys = {r[0]: unwrap(self._master_key, r[2], f"{r[1]}:{r[0]}".encode()) for r in rows}
        data = [r[0] for r in rows if r[1] == "data"]
        current = [r[0] for r in rows if r[1] == "data" and r[3] is None]
        hash_id = next(r[0] for r in rows if r[1] == "hash")
        return KeyBox({k: keys[k] for k in data}, max(current or data), keys[hash_id])

    async def _new_key(self, tx: Tx, purpose: str, now: float) -> tuple[int, bytes]:
        key = os.urandom(KEY_BYTES)
        key_id = await tx.insert(
            "INSERT INTO data_keys (purpose, wrapped, created_at) VALUES ($1, $2, $3)",
            purpose,
            b"",
            now,
        )
        assert key_id is not None
        await tx.execute(
            "UPDATE data_keys SET wrapped = $1 WHERE id = $2",
            wrap(self._master_key, key, f"{purpose}:{key_id}".encode()),
            key_id,
        )
        return key_id, key

    async def _fresh_keybox(self, tx: Tx) -> KeyBox:
        """The keybox, reloaded if another agent rotated the data key since we loaded it."""
        newest = await tx.fetchval(
            "SELECT MAX(id) FROM data_keys WHERE purpose = 'data' AND retired_at IS NULL"
        )
        if newest is not None and newest != self.keybox.current:
            self._keybox = await self._load_keys(tx)
        return self.keybox

    async def _key_rows(
        self, tx: Tx, sku: str, items: Sequence[CardItem], source: str, now: float
    ) -> list[tuple[Any, ...]]:
        """(sku, key_id, sealed, secret_hash, source, added_at, expires_at) rows of new card
        keys."""
        box = await self._fresh_keybox(tx)
        rows = []
        for item in items:
            key_id, sealed = box.seal(sku, item)
            rows.append((sku, key_id, sealed, box.digest(item), source, now, item.expires_at))
        return rows

    @staticmethod
    async def _expired_counts(tx: Tx, now: float) -> dict[str, int]:
        """Free keys past their expiry per SKU, from their own small index (most shops have
        none): what the free counts leave out."""
        rows = await tx.fetch(
            "SELECT sku, COUNT(*) FROM card_keys WHERE state = 'free'"
            " AND expires_at IS NOT NULL AND expires_at <= $1 GROUP BY sku",
            now,
        )
        return {r[0]: r[1] for r in rows}

    @classmethod
    async def _sellable_counts(cls, tx: Tx, now: float) -> dict[str, int]:
        """Free keys per SKU that may still be sold: counted from the free keys' index, less
        those past their expiry."""
        rows = await tx.fetch(
            "SELECT sku, COUNT(*) FROM card_keys WHERE state = 'free' GROUP BY sku"
        )
        expired = await cls._expired_counts(tx, now)
        return {r[0]: r[1] - expired.get(r[0], 0) for r in rows}

    async def _open_rows(self, tx: Tx, rows: Sequence[Row]) -> list[CardItem]:
        """(sku, key_id, sealed, secret_hash) rows -> card keys."""
        box = await self._box_for(tx, [r[1] for r in rows])
        return [box.open(r[0], r[1], r[2], r[3]) for r in rows]

    async def _box_for(self, tx: Tx, key_ids: Sequence[int]) -> KeyBox:
        """The keybox, reloaded if it lacks one of `key_ids` (another agent sealed with a
        data key it added since we loaded ours)."""
        box = self.keybox
        if not all(box.knows(key_id) for key_id in key_ids):
            self._keybox = box = await self._load_keys(tx)
        return box

    @staticmethod
    async def _bind_keys(
        tx: Tx, binds: Sequence[Sequence[Any]], refusal: str, **names: Any
    ) -> None:
        """Binds free keys to lines' slots: (line id, slot, now, key id) rows of BIND. A key
        taken meanwhile: StoreError saying `refusal` (a msgid; %(bound)s and %(wanted)s are
        given besides `names`), to undo the transaction."""
        if (bound := await tx.executemany(BIND, binds)) != len(binds):
            raise phrased(StoreError, refusal, bound=bound, wanted=len(binds), **names)

    @staticmethod
    async def _lines(tx: Tx, where: str, *args: Any) -> list[OrderLine]:
        """The lines `where` (a template: `WHERE ... ORDER BY ...`) selects, as read."""
        rows = await tx.fetch(f"SELECT {LINE_COLUMNS} FROM orders {where}", *args)
        return [line_from_row(r) for r in rows]

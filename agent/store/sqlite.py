"""SQLite implementation of the Store port.

One connection, owned by one worker thread: every call is shipped to that thread and runs
atomically (see SQLiteBase._tx: group commit, one savepoint per call), so a SIGKILL at any point
leaves either the whole call or nothing (WAL + synchronous=FULL). The methods live in one
module per concern; this class puts them together.
"""

from __future__ import annotations

from agent.store.rows import migrations
from agent.store.sqlite_alerts import AlertsLedger
from agent.store.sqlite_orders import OrdersLedger
from agent.store.sqlite_purchases import PurchasesLedger
from agent.store.sqlite_stock import StockLedger


class SQLiteStore(OrdersLedger, PurchasesLedger, AlertsLedger, StockLedger):
    pass


__all__ = ["SQLiteStore", "migrations"]

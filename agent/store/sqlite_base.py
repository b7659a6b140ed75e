"""Moved: the SQLite engine is agent/store/sqlite.py. Kept for a caller still importing the
daemon's ledger lock from here (agent/runtime.py); to go once it imports from there."""

from agent.store.sqlite import exclusive_ledger

__all__ = ["exclusive_ledger"]

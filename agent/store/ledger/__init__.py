"""The ledger bodies, written once over the transaction contract (agent/store/tx.py)."""

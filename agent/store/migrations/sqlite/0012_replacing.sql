-- A key replacement under way (agent/aftersales.py replace_key): the idempotency key of the
-- delivery it replaces, set with the new delivery generation and cleared once delivered, so
-- the engine finishes a replacement its caller could not (a CLI killed after the ledger step).
ALTER TABLE orders ADD COLUMN replaces TEXT;

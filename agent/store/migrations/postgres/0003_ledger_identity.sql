-- The ledger's identity: a random id given once by `kami-agent init` (or by the first open
-- of a database made before ids existed); see agent/store/identity.py.
CREATE TABLE ledger_meta (
    key     TEXT PRIMARY KEY,
    value   TEXT NOT NULL
);
-- A key is unique across all SKUs: an import looks each key up by its keyed hash alone, and
-- refuses one this ledger holds under another SKU or has already bound to an order.
CREATE INDEX card_keys_secret_hash ON card_keys (secret_hash);

-- A key replacement under way: see the SQLite ledger's migration 0012.
ALTER TABLE orders ADD COLUMN replaces TEXT;

-- Consignment (issue 17 item 3): a SKU's keys handed to a platform's own card pool (Agiso's
-- 卡种, cpcId) are `consigned`: bound to the pool in the same transaction as the add intent,
-- never free, never delivered by the agent; the platform sells them, and a sale binds them to
-- the order line its send log names.

-- One pool a SKU is consigned to, on one platform account. `adds` numbers the intents, so
-- each one's reference is deterministic.
CREATE TABLE pools (
    id          INTEGER PRIMARY KEY,
    platform    TEXT NOT NULL,
    cpc_id      TEXT NOT NULL,
    sku         TEXT NOT NULL,
    adds        INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    UNIQUE (platform, cpc_id)
);

-- One add of keys to a pool: committed (with its keys consigned) before the call, its outcome
-- after it. An unclear outcome is settled by adding the very same keys again.
CREATE TABLE pool_adds (
    id          INTEGER PRIMARY KEY,
    pool_id     INTEGER NOT NULL REFERENCES pools (id),
    reference   TEXT NOT NULL UNIQUE,
    state       TEXT NOT NULL CHECK (state IN ('intent', 'unknown', 'added', 'partial',
                    'failed')),
    quantity    INTEGER NOT NULL,
    added       INTEGER,
    refused     INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0,
    detail      TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX pool_adds_open ON pool_adds (pool_id) WHERE state IN ('intent', 'unknown');

-- card_keys gains the state `consigned`, the add that consigned a key (kept once it is sold:
-- which pool the buyer's key came through) and the time a StockBack of it began. SQLite cannot
-- alter a CHECK constraint; for a wider one, which every stored row already satisfies, its
-- documented way is to edit the table's SQL in place (sqlite.org/lang_altertable.html,
-- "writable_schema"), then reload the schema (RESET): no row is copied.
PRAGMA writable_schema = ON;
UPDATE sqlite_master
   SET sql = replace(sql, '''bound'', ''void'')', '''bound'', ''void'', ''consigned'')')
 WHERE type = 'table' AND name = 'card_keys' AND instr(sql, '''consigned''') = 0;
PRAGMA writable_schema = RESET;
ALTER TABLE card_keys ADD COLUMN pool_add_id INTEGER REFERENCES pool_adds (id)
    CHECK (pool_add_id IS NOT NULL OR state != 'consigned');
ALTER TABLE card_keys ADD COLUMN returning_since REAL
    CHECK (returning_since IS NULL OR state = 'consigned');
CREATE INDEX card_keys_consigned ON card_keys (pool_add_id) WHERE state = 'consigned';

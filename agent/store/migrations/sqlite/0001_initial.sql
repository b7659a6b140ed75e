-- One row per order line; the row carries its own retry schedule (attempts, next_attempt_at)
-- so long waits survive restarts.
CREATE TABLE orders (
    id                  INTEGER PRIMARY KEY,
    platform            TEXT NOT NULL,
    order_id            TEXT NOT NULL,
    line                INTEGER NOT NULL DEFAULT 0,
    sku                 TEXT NOT NULL,
    quantity            INTEGER NOT NULL,
    state               TEXT NOT NULL CHECK (state IN ('new', 'backordered', 'purchasing',
                            'allocated', 'delivering', 'delivered', 'needs_attention',
                            'refunded', 'cancelled')),
    reason              TEXT,
    paid_at             TEXT,
    amount              TEXT,
    currency            TEXT,
    buyer_contact       TEXT,
    deliver_by          TEXT,
    seen_at             REAL NOT NULL,
    delivery_generation INTEGER NOT NULL DEFAULT 0,
    delivery_key        TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL DEFAULT 0,
    ambiguous           INTEGER NOT NULL DEFAULT 0,
    delivered_at        REAL,
    updated_at          REAL NOT NULL,
    UNIQUE (platform, order_id, line),
    CHECK (state != 'needs_attention' OR reason IS NOT NULL)
);
CREATE INDEX orders_due ON orders (state, next_attempt_at);
CREATE INDEX orders_sku_state ON orders (sku, state);

-- Data keys that seal card keys, each wrapped (AES-GCM) by the master key, which never
-- enters the ledger. purpose: 'data' seals card keys, 'hash' keys the duplicate-detection HMAC.
CREATE TABLE data_keys (
    id          INTEGER PRIMARY KEY,
    purpose     TEXT NOT NULL CHECK (purpose IN ('data', 'hash')),
    wrapped     BLOB NOT NULL,
    created_at  REAL NOT NULL,
    retired_at  REAL
);

-- Every key ever imported or purchased stays here: free, bound to one order line, or void
-- with a reason. Nothing deletes rows from this table. The card number and secret are only
-- ever stored sealed (AES-256-GCM, see agent/keybox.py); secret_hash is a keyed HMAC.
CREATE TABLE card_keys (
    id              INTEGER PRIMARY KEY,
    sku             TEXT NOT NULL,
    sealed          BLOB NOT NULL,
    key_id          INTEGER NOT NULL REFERENCES data_keys (id),
    secret_hash     BLOB NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('free', 'bound', 'void')),
    order_line_id   INTEGER REFERENCES orders (id),
    slot            INTEGER,
    void_reason     TEXT,
    source          TEXT NOT NULL,
    added_at        REAL NOT NULL,
    bound_at        REAL,
    UNIQUE (sku, secret_hash),
    -- A line has exactly `quantity` slots, each holding at most one key.
    UNIQUE (order_line_id, slot),
    CHECK ((state = 'bound') = (order_line_id IS NOT NULL AND slot IS NOT NULL)),
    CHECK (state != 'void' OR void_reason IS NOT NULL)
);
CREATE INDEX card_keys_free ON card_keys (sku, id) WHERE state = 'free';

-- A bound key never goes back to free, and no key changes hands between lines.
CREATE TRIGGER card_keys_stay_bound BEFORE UPDATE OF state, order_line_id, slot ON card_keys
WHEN OLD.state = 'bound' AND (NEW.state != 'bound' OR NEW.order_line_id != OLD.order_line_id
                              OR NEW.slot != OLD.slot)
BEGIN
    SELECT RAISE(ABORT, 'a bound card key cannot be unbound or rebound');
END;
CREATE TRIGGER card_keys_no_delete BEFORE DELETE ON card_keys
BEGIN
    SELECT RAISE(ABORT, 'card keys are never deleted; void them with a reason');
END;

CREATE TABLE events (
    id              INTEGER PRIMARY KEY,
    order_line_id   INTEGER NOT NULL REFERENCES orders (id),
    at              REAL NOT NULL,
    kind            TEXT NOT NULL,
    detail          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_line ON events (order_line_id, id);

CREATE TABLE cursors (
    platform    TEXT PRIMARY KEY,
    cursor      TEXT,
    updated_at  REAL NOT NULL
);

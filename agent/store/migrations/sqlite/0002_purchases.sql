-- One row per purchase attempt at a supplier. The merchant_ref is committed here before the
-- request leaves, so after a crash or a lost response we can ask the supplier about it.
CREATE TABLE purchases (
    id              INTEGER PRIMARY KEY,
    order_line_id   INTEGER NOT NULL REFERENCES orders (id),
    supplier        TEXT NOT NULL,
    sku             TEXT NOT NULL,
    quantity        INTEGER NOT NULL,
    merchant_ref    TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL CHECK (state IN ('intent', 'unknown', 'processing',
                        'completed', 'failed')),
    purchase_id     TEXT,
    failure         TEXT,
    created_at      REAL NOT NULL,
    unknown_since   REAL,
    updated_at      REAL NOT NULL
);
CREATE INDEX purchases_line ON purchases (order_line_id, id);
-- At most one purchase in flight per order line: the second blind purchase is impossible.
CREATE UNIQUE INDEX purchases_one_open_per_line ON purchases (order_line_id)
    WHERE state IN ('intent', 'unknown', 'processing');

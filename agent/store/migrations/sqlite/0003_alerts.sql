-- Alerts fire once per crossing: one row per alert key, open until the condition clears.
CREATE TABLE alerts (
    key             TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('open', 'resolved')),
    severity        TEXT NOT NULL,
    summary         TEXT NOT NULL,
    opened_at       REAL NOT NULL,
    last_sent_at    REAL NOT NULL,
    escalations     INTEGER NOT NULL DEFAULT 0,
    resolved_at     REAL
);

-- Notifications to send, written in the same transaction as the alert state change, so a
-- crash between deciding and sending loses nothing.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    channel         TEXT NOT NULL,
    alert_key       TEXT NOT NULL,
    payload         TEXT NOT NULL,
    created_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    sent_at         REAL,
    dead_at         REAL,
    last_error      TEXT
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE sent_at IS NULL AND dead_at IS NULL;

ALTER TABLE orders ADD COLUMN notice_sent_at REAL;
ALTER TABLE orders ADD COLUMN refund_key TEXT;

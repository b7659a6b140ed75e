-- After-sales and real stock files (issue 19):
-- * a key's expiry from a 3-column stock file: a free key past it is never bound, and is
--   counted apart (the small index below counts them without reading the key rows);
-- * a bound key replaced on a delivered order goes void with its reason and remembers the
--   line it was bound to (was_bound_to); such a key never returns to stock, and `stock
--   unvoid` returns only keys voided while free (bound_at IS NULL);
-- * per-buyer purchase limits read a buyer's recent lines by contact;
-- * the console counts deliveries since a time and their latency from one index;
-- * every alert closed is kept in alert_history (alerts keeps one row per key, reopened in
--   place).
ALTER TABLE card_keys ADD COLUMN expires_at REAL;
ALTER TABLE card_keys ADD COLUMN was_bound_to INTEGER REFERENCES orders (id);
CREATE INDEX card_keys_free_expiring ON card_keys (sku, expires_at)
    WHERE state = 'free' AND expires_at IS NOT NULL;

-- A bound key never goes back to free and never changes hands; it may only go void, off its
-- line, when it says which line it was bound to (a bad key replaced). A key once bound and
-- voided stays void.
DROP TRIGGER IF EXISTS card_keys_stay_bound;
CREATE TRIGGER card_keys_stay_bound BEFORE UPDATE OF state, order_line_id, slot ON card_keys
WHEN OLD.state = 'bound'
     AND NOT (NEW.state = 'void' AND NEW.was_bound_to IS OLD.order_line_id)
     AND (NEW.state != 'bound' OR NEW.order_line_id != OLD.order_line_id
          OR NEW.slot != OLD.slot)
BEGIN
    SELECT RAISE(ABORT, 'a bound card key cannot be unbound or rebound');
END;
CREATE TRIGGER card_keys_replaced_stay_void BEFORE UPDATE OF state ON card_keys
WHEN OLD.was_bound_to IS NOT NULL AND NEW.state != 'void'
BEGIN
    SELECT RAISE(ABORT, 'a card key replaced on an order stays void');
END;

CREATE INDEX orders_buyer ON orders (buyer_contact, seen_at) WHERE buyer_contact IS NOT NULL;
CREATE INDEX orders_delivered ON orders (delivered_at, seen_at) WHERE state = 'delivered';

CREATE TABLE alert_history (
    id              INTEGER PRIMARY KEY,
    key             TEXT NOT NULL,
    kind            TEXT NOT NULL,
    severity        TEXT NOT NULL,
    summary         TEXT NOT NULL,
    opened_at       REAL NOT NULL,
    resolved_at     REAL NOT NULL,
    escalations     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX alert_history_resolved ON alert_history (resolved_at);
INSERT INTO alert_history (key, kind, severity, summary, opened_at, resolved_at, escalations)
    SELECT key, kind, severity, summary, opened_at, resolved_at, escalations FROM alerts
    WHERE state = 'resolved' AND resolved_at IS NOT NULL ORDER BY resolved_at;

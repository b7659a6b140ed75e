-- Responder platforms (issue 16): the platform calls the agent's listener (agent/listener.py)
-- and wants the keys in the reply.
--
-- The line states `reserved` and `provided` (agent/lifecycle.py). SQLite cannot alter a CHECK
-- constraint; for a change every stored row already satisfies (a wider CHECK), its documented
-- way is to edit the table's SQL in place (sqlite.org/lang_altertable.html, "writable_schema"),
-- then reload the schema (RESET). Matching the word 'cancelled' only, so a state list another
-- migration widened before this one is widened too.
PRAGMA writable_schema = ON;
UPDATE sqlite_master
   SET sql = replace(sql, '''cancelled''', '''cancelled'', ''reserved'', ''provided''')
 WHERE type = 'table' AND name = 'orders' AND instr(sql, '''reserved''') = 0;
PRAGMA writable_schema = RESET;

-- The reply each platform call got, sealed (a PROVIDE's reply carries card keys), kept for
-- ever: a call repeated for the same order and action gets these very bytes again, never a
-- reply computed anew (and so never other keys). Written in the transaction that made the
-- change the reply reports: committed before the reply is sent.
CREATE TABLE replies (
    platform    TEXT NOT NULL,
    order_id    TEXT NOT NULL,
    action      TEXT NOT NULL,
    status      INTEGER NOT NULL,
    key_id      INTEGER NOT NULL REFERENCES data_keys (id),
    sealed      BLOB NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (platform, order_id, action)
);

-- Callbacks a responder owes its platform (a dujiao-next shop's callback_url), written in the
-- transaction that bound the keys they report, sealed (they carry the keys), drained with
-- retries like the alert outbox.
CREATE TABLE callbacks (
    id              INTEGER PRIMARY KEY,
    platform        TEXT NOT NULL,
    order_line_id   INTEGER NOT NULL UNIQUE REFERENCES orders (id),
    url             TEXT NOT NULL,
    key_id          INTEGER NOT NULL REFERENCES data_keys (id),
    sealed          BLOB NOT NULL,
    created_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    sent_at         REAL,
    dead_at         REAL,
    last_error      TEXT
);
CREATE INDEX callbacks_due ON callbacks (next_attempt_at) WHERE sent_at IS NULL AND dead_at IS NULL;

-- A reservation's keys go back to stock when the platform cancels before asking for them
-- (Eneba's CANCEL before PROVIDE) or the reservation runs out unpaid: a key bound to a line
-- still `reserved` may go free again, off its line. Everything else of 0009 stands: a bound
-- key never changes hands, and goes void only naming the line it was bound to.
DROP TRIGGER IF EXISTS card_keys_stay_bound;
CREATE TRIGGER card_keys_stay_bound BEFORE UPDATE OF state, order_line_id, slot ON card_keys
WHEN OLD.state = 'bound'
     AND NOT (NEW.state = 'void' AND NEW.was_bound_to IS OLD.order_line_id)
     AND NOT (NEW.state = 'free' AND NEW.order_line_id IS NULL AND NEW.slot IS NULL
              AND (SELECT state FROM orders WHERE id = OLD.order_line_id) = 'reserved')
     AND (NEW.state != 'bound' OR NEW.order_line_id != OLD.order_line_id
          OR NEW.slot != OLD.slot)
BEGIN
    SELECT RAISE(ABORT, 'a bound card key cannot be unbound or rebound');
END;

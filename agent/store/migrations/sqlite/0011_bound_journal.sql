-- The history of the keys this ledger let out (agent/store/bound_journal.py): a journal file
-- beside the ledger that a restore from backup does not roll back.
--
-- Every change of a key into `bound` or `consigned` (it may leave the box: to a buyer, to a
-- platform's pool) and back to `free` (a reservation cancelled, a pool entry taken back) is
-- noted here by a trigger, in the transaction that made it; the engine appends the notes to
-- the journal (fsync) right after that transaction commits and before its callers see the
-- keys, and deletes them in its next transaction. A note survives a crash until appended.
CREATE TABLE bound_pending (
    secret_hash BLOB NOT NULL,
    freed       INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER card_keys_let_out AFTER UPDATE OF state ON card_keys
WHEN NEW.state IN ('bound', 'consigned') AND OLD.state NOT IN ('bound', 'consigned')
BEGIN
    INSERT INTO bound_pending (secret_hash) VALUES (NEW.secret_hash);
END;
CREATE TRIGGER card_keys_let_out_new AFTER INSERT ON card_keys
WHEN NEW.state IN ('bound', 'consigned')
BEGIN
    INSERT INTO bound_pending (secret_hash) VALUES (NEW.secret_hash);
END;
CREATE TRIGGER card_keys_taken_back AFTER UPDATE OF state ON card_keys
WHEN NEW.state = 'free' AND OLD.state IN ('bound', 'consigned')
BEGIN
    INSERT INTO bound_pending (secret_hash, freed) VALUES (NEW.secret_hash, 1);
END;

-- Keys the journal says were let out but that this ledger does not hold at all (a ledger
-- restored from a backup older than their import): an import refuses them.
CREATE TABLE bound_history (
    secret_hash BLOB PRIMARY KEY,
    noted_at    REAL NOT NULL
) WITHOUT ROWID;

-- Keys let out by this ledger that it does not hold (see the SQLite ledger's bound-keys
-- journal, agent/store/bound_journal.py). A PostgreSQL ledger keeps no journal file (its
-- history is the database's own: point-in-time recovery), so this stays empty here; the
-- import's statement, written once for both ledgers, reads it.
CREATE TABLE bound_history (
    secret_hash BYTEA PRIMARY KEY,
    noted_at    DOUBLE PRECISION NOT NULL
);

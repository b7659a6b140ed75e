"""The database's own guard on the transition table: triggers generated from
agent/lifecycle.py, made again at every open where the ledger's differ, so code and database
never disagree. A write moving a line or a purchase along an edge not in the table (or
inserting one in a state no edge starts from) is refused by the database itself.

The allowed pairs are one string searched once per row (`instr`): a list of pairs after
`IN` makes SQLite build a table at each statement, several times the cost of the update.
"""

from __future__ import annotations

import hashlib
from typing import Any

from agent import lifecycle
from agent.domain import KeyState, LineState, PurchaseState
from agent.pool_domain import PoolAddState

TABLES: tuple[tuple[str, type[Any]], ...] = (
    ("orders", LineState),
    ("purchases", PurchaseState),
    ("card_keys", KeyState),
    ("pool_adds", PoolAddState),
)
MESSAGE = "not an allowed transition (agent/lifecycle.py)"


def _pairs(kind: type[Any]) -> str:
    """',a>b,c>d,': every allowed from>to pair, to find ',old>new,' in."""
    edges = lifecycle.table(kind)
    return "," + ",".join(f"{e.source.value}>{e.target.value}" for e in edges if e.source) + ","


def _inserted(kind: type[Any]) -> str:
    edges = lifecycle.table(kind)
    return "," + ",".join(sorted({e.target.value for e in edges if e.source is None})) + ","


def sqlite_triggers() -> dict[str, str]:
    """Trigger name -> its CREATE TRIGGER statement, as sqlite_master keeps it."""
    out = {}
    for table, kind in TABLES:
        out[f"{table}_lifecycle"] = (
            f"CREATE TRIGGER {table}_lifecycle BEFORE UPDATE OF state ON {table}"
            # A row rewritten in the state it has is no transition (an UPDATE of other columns,
            # or of a whole set some rows of which are already there).
            f" WHEN OLD.state != NEW.state AND"
            f" instr('{_pairs(kind)}', ',' || OLD.state || '>' || NEW.state || ',') = 0"
            f" BEGIN SELECT RAISE(ABORT, '{table}.state: {MESSAGE}'); END"
        )
        out[f"{table}_lifecycle_insert"] = (
            f"CREATE TRIGGER {table}_lifecycle_insert BEFORE INSERT ON {table}"
            f" WHEN instr('{_inserted(kind)}', ',' || NEW.state || ',') = 0"
            f" BEGIN SELECT RAISE(ABORT, '{table}.state: {MESSAGE}'); END"
        )
    return out


def postgres_statements() -> list[str]:
    """The function and triggers, replaced in place (CREATE OR REPLACE). The function runs
    only when a trigger's WHEN clause finds the row outside the table."""
    out = [
        "CREATE OR REPLACE FUNCTION lifecycle_refused() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN IF TG_OP = 'INSERT' THEN RAISE EXCEPTION '%.state: % may not be inserted: %',"
        f" TG_TABLE_NAME, NEW.state, '{MESSAGE}' USING ERRCODE = 'check_violation'; END IF;"
        " RAISE EXCEPTION '%.state: % -> % is %', TG_TABLE_NAME, OLD.state, NEW.state,"
        f" '{MESSAGE}' USING ERRCODE = 'check_violation'; END $$"
    ]
    for table, kind in TABLES:
        out += [
            f"CREATE OR REPLACE TRIGGER {table}_lifecycle BEFORE UPDATE OF state ON {table}"
            f" FOR EACH ROW WHEN (OLD.state != NEW.state AND strpos('{_pairs(kind)}', ',' ||"
            " OLD.state || '>' || NEW.state || ',') = 0) EXECUTE FUNCTION lifecycle_refused()",
            f"CREATE OR REPLACE TRIGGER {table}_lifecycle_insert BEFORE INSERT ON {table}"
            f" FOR EACH ROW WHEN (strpos('{_inserted(kind)}', ',' || NEW.state || ',') = 0)"
            " EXECUTE FUNCTION lifecycle_refused()",
        ]
    return out


def postgres_version() -> str:
    """What the installed guards are marked with (a comment on the function)."""
    return hashlib.sha256("\n".join(postgres_statements()).encode()).hexdigest()[:16]

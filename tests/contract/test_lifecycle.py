"""The transition table (agent/lifecycle.py) is the one place the line and purchase states
and their edges are written: the ledger's event kinds map to its edges, the database refuses
any other transition (triggers generated from it), and docs/design.md shows it."""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent import lifecycle
from agent.domain import LineState, PlatformOrder, PurchaseState
from agent.store import guards
from agent.store.base import LedgerRefused, Store
from agent.store.sqlite import SQLiteStore
from agent.store.tx import fill
from tests.conftest import master_key_for_tests, stock

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000.0


def _recorded_kinds() -> tuple[dict[str, str], list[str]]:
    """Event kinds the code records: kind -> where, and the calls whose kind is computed.
    The ledger writes events with _event(tx, line, KIND, ...) or as (line, KIND, detail)
    rows of an `events` batch (or (line, at, KIND, detail) rows of the EVENT statement);
    callers outside the store with store.add_event(line, KIND)."""
    found: dict[str, str] = {}
    computed: list[str] = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            kinds: list[ast.expr] = []
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                if name == "_event" and len(node.args) > 2:
                    kinds.append(node.args[2])
                elif name == "add_event" and len(node.args) > 1:
                    kinds.append(node.args[1])
                elif name == "append" and getattr(node.func.value, "id", "") == "events":
                    if isinstance(node.args[0], ast.Tuple):
                        row = node.args[0].elts  # (line, KIND, detail) or EVENT's 4 columns
                        kinds.append(row[2] if len(row) == 4 else row[1])
                elif name == "_take_lines" and isinstance(node.args[4], ast.Attribute):
                    # a responder's lines taken in: each records its state (LineState.X)
                    state = LineState[node.args[4].attr].value
                    kinds.append(ast.Constant(state, lineno=node.args[4].lineno))
                elif name == "_events" and isinstance(node.args[1], ast.ListComp | ast.List):
                    rows = node.args[1]
                    elts = [rows.elt] if isinstance(rows, ast.ListComp) else rows.elts
                    kinds += [e.elts[1] for e in elts if isinstance(e, ast.Tuple)]
            for kind in kinds:
                where = f"{path.relative_to(ROOT)}:{kind.lineno}"
                if isinstance(kind, ast.Constant) and isinstance(kind.value, str):
                    found.setdefault(kind.value, where)
                else:
                    computed.append(where)
    return found, computed


def test_every_event_kind_recorded_is_an_edge_of_the_table_or_a_note() -> None:
    found, computed = _recorded_kinds()
    edges = lifecycle.event_kinds(LineState) | lifecycle.event_kinds(PurchaseState)
    unknown = {k: w for k, w in found.items() if k not in edges | lifecycle.NOTE_EVENTS}
    assert unknown == {}, "event kinds missing from agent/lifecycle.py"
    # Computed kinds: add_event's (its callers' are scanned) and close_line's, the state it
    # closes to (cancelled or refunded); and the responder's _take_lines, the state its lines
    # are taken in (its callers' are scanned).
    files = [w.split(":")[0] for w in computed]
    assert set(files) == {"agent/store/ledger/orders.py", "agent/store/ledger/responder.py"}
    assert files.count("agent/store/ledger/responder.py") == 1
    assert {"cancelled", "refunded"} <= edges
    # Every edge is recorded somewhere (a kind nobody records would be a dead edge).
    assert edges - set(found) <= {"cancelled", "refunded"}


def test_sql_guards_are_rendered_from_the_table() -> None:
    assert fill("{line_to:delivered}", {}) == "state != 'delivered'"
    assert fill("{line_to:backordered}", {}) == "state IN ('new', 'backordered', 'purchasing')"
    assert fill("{purchase_to:unknown}", {}) == "state IN ('intent', 'unknown')"
    assert fill("{line_class:waiting}", {}) == "('new', 'backordered', 'purchasing')"


async def _raw(store: Store, tmp_path: Path, sql: str, *args: Any) -> None:
    """One statement on a connection of its own, as someone with the database would run it."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(tmp_path / "kami.db") as conn:
            conn.execute(sql.replace("$1", "?").replace("$2", "?"), args)
        return
    import asyncpg

    conn = await asyncpg.connect(store.url)  # type: ignore[attr-defined]
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


def _refused() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [sqlite3.IntegrityError]
    try:
        import asyncpg

        kinds.append(asyncpg.CheckViolationError)
    except ImportError:  # pragma: no cover - the PostgreSQL tests are skipped then
        pass
    return tuple(kinds)


async def test_a_transition_outside_the_table_is_refused_by_the_database(
    store: Store, tmp_path: Path
) -> None:
    assert not lifecycle.allowed(LineState, LineState.BACKORDERED, LineState.DELIVERING)
    (line_id,) = await store.ingest("main", [PlatformOrder("A", "paid", "GAME-100", 1)], NOW)
    assert (await store.allocate(line_id, NOW)).state == LineState.BACKORDERED  # no stock
    with pytest.raises(_refused(), match="not an allowed transition"):
        await _raw(store, tmp_path, "UPDATE orders SET state = 'delivering' WHERE id = $1", line_id)
    with pytest.raises(_refused(), match="not an allowed transition"):
        await _raw(
            store,
            tmp_path,
            "INSERT INTO orders (platform, order_id, sku, quantity, state, seen_at, updated_at)"
            " VALUES ('main', 'B', 'GAME-100', 1, 'delivered', 0, 0)",
        )
    # Through the store's own transactions: an error of the AgentError tree, nothing raw.
    with pytest.raises(LedgerRefused, match="not an allowed transition"):
        await store._write(  # type: ignore[attr-defined]
            lambda tx: tx.execute("UPDATE orders SET state = 'delivering' WHERE id = $1", line_id)
        )
    assert (await store.get_line(line_id)).state == LineState.BACKORDERED  # type: ignore[union-attr]
    # An edge of the table is let through, by the store and by hand.
    await stock(store, "GAME-100", 1)
    await store.allocate(line_id, NOW)
    await _raw(store, tmp_path, "UPDATE orders SET state = 'delivering' WHERE id = $1", line_id)


async def test_a_purchase_transition_outside_the_table_is_refused(
    store: Store, tmp_path: Path
) -> None:
    (line_id,) = await store.ingest("main", [PlatformOrder("A", "paid", "GAME-100", 1)], NOW)
    purchase = await store.begin_purchase(line_id, "fulu", NOW)
    await store.purchase_failed(purchase, "no", NOW)
    assert not lifecycle.allowed(PurchaseState, PurchaseState.FAILED, PurchaseState.INTENT)
    with pytest.raises(_refused(), match="not an allowed transition"):
        await _raw(
            store, tmp_path, "UPDATE purchases SET state = 'intent' WHERE id = $1", purchase.id
        )


async def test_the_guards_are_made_again_when_the_ledger_lacks_them(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "kami.db", master_key_for_tests(), opening=_create())
    await store.open()
    (line_id,) = await store.ingest("main", [PlatformOrder("A", "paid", "GAME-100", 1)], NOW)
    await store.allocate(line_id, NOW)  # backordered: no stock
    await store.close()
    with sqlite3.connect(tmp_path / "kami.db") as conn:
        conn.execute("DROP TRIGGER orders_lifecycle")
        conn.execute("UPDATE orders SET state = 'delivering' WHERE id = ?", (line_id,))
        conn.execute("UPDATE orders SET state = 'backordered' WHERE id = ?", (line_id,))
    await store.open()  # made again from agent/lifecycle.py
    await store.close()
    with sqlite3.connect(tmp_path / "kami.db") as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        assert set(guards.sqlite_triggers()) <= names
        with pytest.raises(sqlite3.IntegrityError, match="not an allowed transition"):
            conn.execute("UPDATE orders SET state = 'delivering' WHERE id = ?", (line_id,))


def _create() -> Any:
    from agent.store.identity import Opening

    return Opening.CREATE


def test_design_doc_shows_the_transition_table() -> None:
    doc = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    for kind in (LineState, PurchaseState):
        assert f"```mermaid\n{lifecycle.mermaid(kind)}```" in doc, (
            f"docs/design.md: paste agent.lifecycle.mermaid({kind.__name__}) into its block"
        )

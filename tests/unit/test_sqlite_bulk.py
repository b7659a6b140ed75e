"""The SQLite engine runs a batch of rows (a Bulk statement) set-wise, a statement per chunk
of rows, not one per row: each statement pays the lifecycle triggers' program and its own
fixed cost once (issue 14, the hot path's cost)."""

from __future__ import annotations

import re
from typing import Any

from agent.domain import DeliveryIntent, LineState, OrderLine, PlatformOrder
from agent.store.ledger.orders import DELAY, INSERT_LINE
from agent.store.sqlite import SLOTS, SQLiteStore
from agent.store.tx import Expanding, render_sqlite
from tests.conftest import stock

NOW = 1_000.0


class _Counting:
    """The write connection, noting each statement our Tx runs (sqlite3's own trace also
    reports each trigger program run, once per row)."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.statements = conn, list[str]()

    def execute(self, sql: str, *args: Any) -> Any:
        self.statements.append(sql)
        return self.conn.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> Any:
        rows = list(rows)
        self.statements += [sql] * len(rows)
        return self.conn.executemany(sql, rows)


def _row(order_id: str) -> tuple[Any, ...]:
    return ("main", order_id, "GAME-100", 1, "new", *(None,) * 6, NOW, None, 0)


async def test_a_page_of_orders_is_taken_in_with_a_statement_per_chunk(
    sqlite_store: SQLiteStore,
) -> None:
    await stock(sqlite_store, "GAME-100", 150)
    tx = sqlite_store._wtx
    assert tx is not None
    tx._conn = counting = _Counting(tx._conn)  # type: ignore[assignment]
    orders = [PlatformOrder(f"P{n}", "paid", "GAME-100", 1) for n in range(150)]
    taken = await sqlite_store.take_in("main", orders, NOW, {"GAME-100"})
    tx._conn = counting.conn
    inserts = [s for s in counting.statements if s.startswith("INSERT INTO orders")]
    binds = [s for s in counting.statements if s.startswith("UPDATE card_keys SET state")]
    # 150 rows = 64 + 64 + 16 + 4 + 2: five statements each, not 150.
    assert (len(inserts), len(binds)) == (5, 5)
    assert all(isinstance(t, DeliveryIntent) for t in taken)
    intents = [t for t in taken if isinstance(t, DeliveryIntent)]
    assert [i.line.order_id for i in intents] == [o.order_id for o in orders]
    for intent in intents:  # each id is its own order's row, holding its own key
        line = await sqlite_store.get_line(intent.line.id)
        assert line is not None and line.order_id == intent.line.order_id
        assert await sqlite_store.bound_count(line.id) == 1
    assert len({k for i in intents for k in i.key_ids}) == 150


async def test_a_batch_over_several_chunks_answers_as_row_by_row(
    sqlite_store: SQLiteStore,
) -> None:
    rows = [_row(f"B{n}") for n in range(100)]
    first = await sqlite_store._write(lambda tx: tx.insert_many(INSERT_LINE, rows[:30], key=1))
    again = await sqlite_store._write(lambda tx: tx.insert_many(INSERT_LINE, rows, key=1))
    # Rows already there are left out (None); the others each get their own row's id.
    assert again[:30] == [None] * 30
    assert all(again[30:]) and len(set(again[30:])) == 70
    for row, line_id in zip(rows, first + again[30:], strict=True):
        assert line_id is not None
        line = await sqlite_store.get_line(line_id)
        assert line is not None and line.order_id == row[1]
    ids = [i for i in first + again[30:] if i is not None]
    await sqlite_store.park(ids[0], "parked", NOW)
    # The statement's WHERE holds for each row: the parked line and a missing id are not
    # counted.
    delays = [(NOW + 5, i) for i in [*ids, 999_999]]
    changed = await sqlite_store._write(lambda tx: tx.executemany(DELAY, delays))
    assert changed == 99
    line = await sqlite_store.get_line(ids[1])
    assert line is not None and line.next_attempt_at == NOW + 5


async def test_a_list_of_any_length_runs_one_of_few_statements(
    sqlite_store: SQLiteStore,
) -> None:
    """A list parameter (`= ANY($n)`) is padded to a power of two: batches of 1 to 8 lines
    run 4 statement texts, not 8 (each text is prepared, and kept in sqlite3's cache)."""
    await stock(sqlite_store, "GAME-100", 40)
    orders = [PlatformOrder(f"L{n}", "paid", "GAME-100", 1) for n in range(40)]
    ids = [
        t.id if isinstance(t, OrderLine) else t.line.id
        for t in await sqlite_store.take_in("main", orders, NOW, {"GAME-100"})
    ]
    tx = sqlite_store._wtx
    assert tx is not None
    tx._conn = counting = _Counting(tx._conn)  # type: ignore[assignment]
    start = 0
    for size in range(1, 9):  # 36 lines in batches of 1, 2, ... 8
        await sqlite_store.mark_many_delivered([(i, "ok") for i in ids[start : start + size]], NOW)
        start += size
    tx._conn = counting.conn
    texts = {s for s in counting.statements if s.startswith("UPDATE orders SET state = 'deliv")}
    assert len(texts) == 4  # lists of 1, 2, 4 and 8
    # The padding (the last value again) changes nothing: each line delivered once, with
    # one event, and the others left as they were.
    for n, line_id in enumerate(ids):
        line = await sqlite_store.get_line(line_id)
        assert line is not None
        kinds = [e.kind for e in await sqlite_store.events(line_id)]
        if n < 36:
            assert line.state == LineState.DELIVERED and kinds.count("delivered") == 1
        else:
            assert line.state == LineState.DELIVERING and "delivered" not in kinds


def test_a_long_list_is_bound_by_bare_parameters() -> None:
    """SQLite looks a numbered parameter (`?7`) up among the statement's others when it
    prepares it: a list of numbered ones costs its preparing time quadratic in its length.
    Only the list's first is numbered (it follows every other), the rest are bare `?`."""
    template = (
        "SELECT id FROM orders WHERE platform = $1 AND order_id = ANY($2::text[]) AND line = $3"
    )
    statement = render_sqlite(template, SLOTS)
    assert isinstance(statement, Expanding)
    sql, args = statement.expand(("main", [f"O{n}" for n in range(1000)], 0))
    assert sql.count("?") == 2 + 1024 and len(re.findall(r"\?\d+", sql)) == 3
    assert args[3:5] == ("O0", "O1") and args[-1] == "O999" and len(args) == 3 + 1024

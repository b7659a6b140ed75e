"""The narrow transaction contract the ledger is written over, and how a statement written
once is rendered for each database.

A ledger body (agent/store/ledger/) is `async def body(tx, ...)` and talks to the database
only through `Tx`: execute / executemany / fetch / fetchrow / fetchval, plus insert (the new
row's id) and insert_many (ids of a batch). Statements are written once, in PostgreSQL's
spelling (`$n` parameters, `= ANY($n::type[])` for a list), with named slots for what differs:

- `{skip_locked}`, `{for_update}`: row locks, on PostgreSQL only (one SQLite writer);
- `{lease:N}`, `{lease_free:N}`, `{release}`, `{release_ours}`, `{lease_columns}`,
  `{lease_values:N}`: the leases agents sharing a PostgreSQL ledger keep on lines (`N` is
  the parameter holding the time now);
- `{line_to:TARGET}`, `{purchase_to:TARGET}` (the guard `state` may move to TARGET by),
  `{line_class:NAME}`, `{open_purchase}` (state sets): rendered from the transition table
  (agent/lifecycle.py);
- `{bucket}`, `{orders_by_seen}`, `{orders_delivered}`: an expression or a planner hint one
  database needs.

Each engine renders a statement once and caches it: SQLite gets `?n` parameters and a list
expanded to `IN (...)`; PostgreSQL keeps its own spelling and turns a `Bulk` statement (one
row's statement plus the PostgreSQL types of its parameters) into one set-wise statement
over `unnest` of arrays, where SQLite runs it once per row (executemany). Driver errors are
mapped into the AgentError tree by each engine's Tx (agent/store/base.py lists the classes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent import lifecycle
from agent.domain import LineState, PurchaseState

Row = Any  # a tuple (sqlite3) or an asyncpg.Record: read by position only


@dataclass(frozen=True, slots=True)
class Bulk:
    """One row's statement (INSERT ... VALUES or UPDATE ... WHERE) that a batch of rows runs
    through, and the PostgreSQL types of its parameters `$1..$n` (for the arrays)."""

    sql: str
    types: tuple[str, ...]


class Tx(Protocol):
    """One open transaction. Statements are templates (see the module docstring)."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Runs a statement; the number of rows it changed."""

    async def executemany(self, bulk: Bulk, rows: Sequence[Sequence[Any]]) -> int:
        """Runs a row statement for each of `rows`; the number of rows changed in all."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Every row the statement returns."""

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        """The first row the statement returns, or None."""

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None when there is no row."""

    async def insert(self, sql: str, *args: Any) -> int | None:
        """Inserts one row; its id, or None if ON CONFLICT ... DO NOTHING left it out."""

    async def insert_many(
        self, bulk: Bulk, rows: Sequence[Sequence[Any]], key: int
    ) -> list[int | None]:
        """Inserts rows; the id of each, None where a conflict left it out. `key` is the
        position in a row of a value unique within the batch (how ids find their rows)."""


# --- rendering ------------------------------------------------------------------------------
def _quoted(states: Sequence[LineState] | Sequence[PurchaseState]) -> str:
    return "(" + ", ".join(f"'{s.value}'" for s in states) + ")"


def _may_move(kind: Any, target: str) -> str:
    """`state` may move to `target`: the shorter of the allowed sources and the others."""
    allowed = lifecycle.sources(kind, kind(target))
    others = [s for s in kind if s not in allowed]
    if len(others) == 1:
        return f"state != '{others[0].value}'"
    if len(others) < len(allowed):
        return f"state NOT IN {_quoted(others)}"
    return f"state IN {_quoted(allowed)}"


class _Slot:
    """A named slot whose text depends on what follows the colon in `{name:spec}`."""

    def __init__(self, render: Callable[[str], str]) -> None:
        self._render = render

    def __format__(self, spec: str) -> str:
        return self._render(spec)


LIFECYCLE_SLOTS: dict[str, object] = {
    "line_to": _Slot(lambda target: _may_move(LineState, target)),
    "purchase_to": _Slot(lambda target: _may_move(PurchaseState, target)),
    "line_class": _Slot(lambda name: _quoted(lifecycle.states_in(name))),
    "open_purchase": _quoted(lifecycle.OPEN_PURCHASE),
}


def fill(template: str, slots: Mapping[str, object]) -> str:
    return template.format_map({**LIFECYCLE_SLOTS, **slots})


_LIST = re.compile(r"(\S+)\s*(=\s*ANY|!=\s*ALL)\(\$(\d+)::\w+\[\]\)")
_PARAM = re.compile(r"\$(\d+)")
# What makes a statement answer otherwise run a chunk of its list at a time than whole.
_WHOLE = re.compile(r"\b(LIMIT|ORDER BY|GROUP BY|DISTINCT|COUNT|SUM|MIN|MAX)\b", re.IGNORECASE)


PADDED = 4_096  # lists up to this long are padded (Expanding.expand)


class Expanding:
    """A SQLite statement with a list parameter: `IN (...)` sized at each call."""

    __slots__ = ("_index", "_parts", "_sized", "_splittable")

    def __init__(self, sql: str) -> None:
        match = _LIST.search(sql)
        assert match is not None and len(_LIST.findall(sql)) == 1, sql
        op = "IN" if "ANY" in match.group(2) else "NOT IN"
        self._index = int(match.group(3)) - 1
        before, after = (
            _PARAM.sub(r"?\1", part) for part in (sql[: match.start()], sql[match.end() :])
        )
        self._parts = (f"{before}{match.group(1)} {op} (", f"){after}")
        self._sized: dict[int, str] = {}
        # Chunks answer as the whole only for IN (the union of their rows or changes) with
        # nothing over all the rows at once (a limit, an order, a count).
        self._splittable = op == "IN" and _WHOLE.search(sql) is None

    def expand(self, args: Sequence[Any]) -> tuple[str, tuple[Any, ...]]:
        """The statement for these arguments: the list's values become parameters after
        the others (its own place is bound to NULL and never read). The list is padded to
        a power of two by repeating its last value (the same IN, the same NOT IN): a
        statement for each length would be prepared again and again, each one pushing
        others out of sqlite3's cache of prepared statements (measured, issue 14)."""
        values = list(args[self._index])
        if 0 < len(values) <= PADDED:
            values += values[-1:] * ((1 << (len(values) - 1).bit_length()) - len(values))
        sql = self._sized.get(len(values))
        if sql is None:
            first = len(args) + 1
            # SQLite reads `IN ()` as false and `NOT IN ()` as true, as an empty list means.
            # A bare `?` is numbered one past the largest number so far: a long list costs
            # its preparing no lookup of each number among the statement's named ones.
            marks = ", ".join([f"?{first}"] + ["?"] * (len(values) - 1)) if values else ""
            sql = self._parts[0] + marks + self._parts[1]
            if len(values) <= PADDED:  # a longer list's statement is not worth keeping
                self._sized[len(values)] = sql
        flat = list(args)
        flat[self._index] = None
        return sql, (*flat, *values)

    def chunks(self, args: Sequence[Any], size: int) -> list[tuple[Any, ...]]:
        """The arguments split so no call binds more than `size` list values, where the
        chunks answer as the whole list would (else the arguments whole)."""
        values = list(args[self._index])
        if len(values) <= size or not self._splittable:
            return [tuple(args)]
        out = []
        for start in range(0, len(values), size):
            part = list(args)
            part[self._index] = values[start : start + size]
            out.append(tuple(part))
        return out


def render_sqlite(template: str, slots: Mapping[str, object]) -> str | Expanding:
    sql = fill(template, slots)
    return Expanding(sql) if _LIST.search(sql) else _PARAM.sub(r"?\1", sql)


_INSERT = re.compile(r"INSERT INTO (\w+) \(([^)]*)\) VALUES \(")
_UPDATE_WHERE = re.compile(r" WHERE ")


def _values(sql: str, start: int) -> tuple[list[str], int]:
    """The expressions of the VALUES list opening at `start`, and where the list ends."""
    out, depth, begin = [], 0, start
    for i in range(start, len(sql)):
        ch = sql[i]
        if ch in ",)" and depth == 0:
            out.append(sql[begin:i].strip())
            begin = i + 1
            if ch == ")":
                return out, i + 1
        depth += (ch == "(") - (ch == ")")
    raise ValueError(f"no end to the VALUES list of {sql!r}")


def _returning(columns: str, values: list[str], returning_key: int | None) -> str:
    """` RETURNING id, <the column the row's parameter returning_key goes to>` (or '')."""
    if returning_key is None:
        return ""
    column = columns.split(",")[values.index(f"${returning_key + 1}")].strip()
    return f" RETURNING id, {column}"


def render_bulk_postgres(bulk: Bulk, slots: Mapping[str, object], returning_key: int | None) -> str:
    """One row's statement as one statement over the rows' arrays (`unnest`): an INSERT
    keeps the rows' order (identity values and events in order); an UPDATE joins them."""
    sql = fill(bulk.sql, slots)
    n = len(bulk.types)
    arrays = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(bulk.types))
    names = ", ".join(f"c{i + 1}" for i in range(n))

    def refs(text: str) -> str:
        return _PARAM.sub(lambda m: f"u.c{m.group(1)}", text)

    insert = _INSERT.match(sql)
    if insert is not None:
        table, columns = insert.groups()
        values, end = _values(sql, insert.end())
        return (
            f"INSERT INTO {table} ({columns}) SELECT {refs(', '.join(values))}"
            f" FROM unnest({arrays}) WITH ORDINALITY AS u({names}, n) ORDER BY u.n{sql[end:]}"
            + _returning(columns, values, returning_key)
        )
    assert sql.startswith("UPDATE ") and returning_key is None, sql
    head, where = _UPDATE_WHERE.split(sql, maxsplit=1)
    return f"{refs(head)} FROM unnest({arrays}) AS u({names}) WHERE {refs(where)}"


def render_bulk_sqlite(
    bulk: Bulk, slots: Mapping[str, object], count: int, returning_key: int | None
) -> str:
    """One row's statement as one statement over `count` rows (row r's `$k` bound as
    `?(r*n+k)`): an INSERT lists the rows' VALUES in order; an UPDATE joins a VALUES table
    (SQLite names its columns column1..n). Measured (issue 14): a statement per row paid
    its fixed cost, the lifecycle triggers' program among it, once per row: 11.6 -> 6.4 us
    per order line inserted, 7.6 -> 3.4 per key bound."""
    sql = fill(bulk.sql, slots)
    n = len(bulk.types)

    def row(r: int, text: str) -> str:
        return _PARAM.sub(lambda m: f"?{r * n + int(m.group(1))}", text)

    insert = _INSERT.match(sql)
    if insert is not None:
        values, end = _values(sql, insert.end())
        one = sql[insert.end() - 1 : end]  # "(...)": the row's VALUES
        rows = ", ".join(row(r, one) for r in range(count))
        return f"{sql[: insert.end() - 1]}{rows}{sql[end:]}" + _returning(
            insert.group(2), values, returning_key
        )
    assert sql.startswith("UPDATE ") and returning_key is None, sql
    head, where = _UPDATE_WHERE.split(sql, maxsplit=1)
    table = ", ".join(
        row(r, "(" + ", ".join(f"${k + 1}" for k in range(n)) + ")") for r in range(count)
    )

    def refs(text: str) -> str:
        return _PARAM.sub(lambda m: f"u.column{m.group(1)}", text)

    return f"{refs(head)} FROM (VALUES {table}) AS u WHERE {refs(where)}"


def chunk_sizes(count: int, largest: int) -> list[int]:
    """`count` rows as chunks of powers of two no larger than `largest` (itself one): few
    statement texts to prepare and keep, whatever the batch's size."""
    out = [largest] * (count // largest)
    rest = count % largest
    size = largest
    while rest:
        size //= 2
        if rest >= size:
            out.append(size)
            rest -= size
    return out


def rows_changed(status: str) -> int:
    """The row count of a PostgreSQL command status ('UPDATE 3', 'INSERT 0 1')."""
    tail = status.rpartition(" ")[2]
    return int(tail) if tail.isdigit() else 0

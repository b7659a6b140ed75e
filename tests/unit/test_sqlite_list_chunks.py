"""The SQLite engine binds a long list (`= ANY($n)`) a chunk at a time where the chunks
answer as the whole list would: sqlite3 keeps every statement it prepared, and a statement
with a `?` per list value holds its program (about 200 bytes a value) for as long as the
process runs. The import's two lookups of 20,000 hashes each held 8 MB of the agent's memory
in all."""

from __future__ import annotations

import re

from agent.store.sqlite import SLOTS, SQLiteStore
from agent.store.tx import Expanding, render_sqlite
from tests.conftest import keys, stock
from tests.unit.test_sqlite_bulk import _Counting


async def test_an_import_binds_no_list_longer_than_a_chunk(sqlite_store: SQLiteStore) -> None:
    await stock(sqlite_store, "GAME-100", 3_000)
    tx = sqlite_store._wtx
    assert tx is not None
    tx._conn = counting = _Counting(tx._conn)  # type: ignore[assignment]
    # 4,000 keys, the first 1,000 already held: found whichever chunk they fall in.
    report = await sqlite_store.import_keys("GAME-100", keys("GAME-100", 4_000, 2_000), "t", 0.0)
    tx._conn = counting.conn
    lookups = [s for s in counting.statements if re.search(r" IN \(\?", s)]
    # A page of 1,000 orders' ids still runs whole; a 20,000-key batch's hashes do not.
    assert lookups and max(s.count("?") for s in lookups) <= 1_024
    assert (report.added, report.duplicates) == (3_000, 1_000)
    assert [(c.sku, c.free) for c in await sqlite_store.stock_counts()] == [("GAME-100", 6_000)]


def _split(template: str, args: tuple[object, ...]) -> int:
    statement = render_sqlite(template, SLOTS)
    assert isinstance(statement, Expanding)
    return len(statement.chunks(args, 4))


def test_a_list_is_split_only_where_the_chunks_answer_as_the_whole() -> None:
    """A limit per chunk, an order within each chunk, a count per chunk, NOT IN leaving out
    only the chunk's values: these run whole, however long the list."""
    ids = list(range(10))
    assert _split("SELECT sku FROM card_keys WHERE id = ANY($1::bigint[])", (ids,)) == 3
    assert _split("UPDATE card_keys SET state = $1 WHERE id = ANY($2::bigint[])", ("v", ids)) == 3
    for template, args in (
        ("SELECT id FROM card_keys WHERE id = ANY($1::bigint[]) ORDER BY id LIMIT $2", (ids, 3)),
        ("SELECT id FROM card_keys WHERE sku = $1 AND id != ALL($2::bigint[])", ("G", ids)),
        ("SELECT COUNT(*) FROM card_keys WHERE id = ANY($1::bigint[])", (ids,)),
    ):
        assert _split(template, args) == 1, template

"""migrate-store: a shop's SQLite ledger, mid-business, moved into PostgreSQL by the real CLI;
then agents on PostgreSQL finish its open orders without handing out a key twice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.domain import LineState, RejectedOrder
from agent.sandbox.platform import SandboxPlatform
from agent.store.base import Store, StoreError
from agent.store.identity import Opening
from agent.store.migrate import migrate_sqlite_to_postgres
from agent.store.postgres import PostgresStore
from agent.store.sqlite import SQLiteStore, exclusive_ledger
from tests.conftest import make_config, master_key_for_tests, stock
from tests.daemon import run_cli
from tests.helpers import assert_platform_invariants, delivered_all, running_agent, wait_for

pytest.importorskip("asyncpg")


async def snapshot(store: Store) -> dict[str, object]:
    """Everything a merchant would miss if it got lost."""
    lines = await store.list_lines(None, 10_000)
    return {
        "lines": sorted(lines, key=lambda line: line.id),
        "stock": await store.stock_counts(),
        "bound": {line.id: await store.bound_items(line.id) for line in lines},
        "events": {line.id: await store.events(line.id) for line in lines},
        "alerts": await store.open_alerts(),
        "cursor": await store.get_cursor("main"),
    }


async def test_migrate_store_moves_a_running_shop(
    tmp_path: Path, pg_url: str, sandbox: SandboxPlatform
) -> None:
    # A shop on SQLite: 40 orders delivered, 20 more waiting for stock, a parked one.
    config = make_config(tmp_path, sandbox.base_url)
    db = tmp_path / "kami.db"
    sqlite_store = SQLiteStore(db, master_key_for_tests(), opening=Opening.CREATE)
    await sqlite_store.open()
    await stock(sqlite_store, "GAME-100", 40)
    await stock(sqlite_store, "VIP-30D", 5)
    first = [sandbox.add_order("GAME-100") for _ in range(40)]
    waiting = [sandbox.add_order("GAME-100") for _ in range(20)]
    async with running_agent(config, sqlite_store, sandbox):
        await wait_for(delivered_all(sandbox, first), "the first 40 deliveries")
        await wait_for(
            lambda: _all_backordered(sqlite_store, waiting), "the rest to wait for stock"
        )
    rejected = RejectedOrder("X-1", "unknown SKU 'NOPE' (not in config [skus])")
    await sqlite_store.ingest("main", [rejected], time.time())
    before = await snapshot(sqlite_store)
    await sqlite_store.close()

    # The daemon's lock on the ledger keeps migrate-store off a running shop.
    with exclusive_ledger(db), pytest.raises(StoreError, match="in use by a running agent"):
        await migrate_sqlite_to_postgres(db, pg_url, master_key_for_tests(), say=print)

    out = await run_cli(
        tmp_path / "none.toml",  # no config file: the default store key secret name
        {},
        "migrate-store",
        "--from",
        f"sqlite:{db}",
        "--to",
        pg_url.replace("kami@", "kami:hunter2@"),  # the test server trusts; the URL still has one
    )
    assert "verified: card keys identical" in out and "card_keys: 45 rows" in out
    assert "hunter2" not in out

    pg = PostgresStore(pg_url, master_key_for_tests(), instance="after")
    await pg.open()
    try:
        assert await snapshot(pg) == before
        # A second run refuses: the target is no longer empty.
        with pytest.raises(StoreError, match="already holds a ledger"):
            await migrate_sqlite_to_postgres(db, pg_url, master_key_for_tests(), say=print)
        # The shop goes on from PostgreSQL: new stock arrives, the waiting orders go out.
        await stock(pg, "GAME-100", 20, start=1000)
        later = [sandbox.add_order("VIP-30D") for _ in range(5)]
        async with running_agent(config, pg, sandbox):
            await wait_for(delivered_all(sandbox, waiting + later), "the rest, from PostgreSQL")
        counts = await pg.count_by_state()
        assert counts[LineState.DELIVERED] == 65 and counts[LineState.NEEDS_ATTENTION] == 1
        new_ids = [line.id for line in await pg.list_lines(None, 5)]
        assert min(new_ids) > max(line.id for line in before["lines"])  # type: ignore[attr-defined]
    finally:
        await pg.close()
    assert_platform_invariants(sandbox)
    # SQLite, the backup, is as it was.
    again = SQLiteStore(db, master_key_for_tests())
    await again.open()
    assert await snapshot(again) == before
    await again.close()


async def _all_backordered(store: Store, order_ids: list[str]) -> bool:
    for order_id in order_ids:
        lines = await store.find_lines(order_id)
        if not lines or lines[0].state != LineState.BACKORDERED:
            return False
    return True


def test_migrate_store_names_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.cli import main
    from tests.conftest import STORE_KEY_ENV, TEST_STORE_KEY

    monkeypatch.setenv(STORE_KEY_ENV, TEST_STORE_KEY)
    monkeypatch.setenv("KAMI_AGENT_CONFIG", str(tmp_path / "absent.toml"))
    db = tmp_path / "kami.db"
    db.write_bytes(b"")
    cases = {
        ("mysql://x", "postgresql://kami@127.0.0.1/x"): "--from must be sqlite:",
        (f"sqlite:{tmp_path}/nope.db", "postgresql://kami@127.0.0.1/x"): "no SQLite ledger at",
        (f"sqlite:{db}", "sqlite:/tmp/x.db"): "--to must be a postgresql://",
        (f"sqlite:{db}", "mysql://kami:hunter2@127.0.0.1/x"): "--to must be a postgresql://",
        (f"sqlite:{db}", "postgresql://kami:hunter2@127.0.0.1:1/x"): "cannot connect to",
        # nothing listens on port 1 of loopback
        (f"sqlite:{db}", "postgresql://kami@127.0.0.1:1/x"): "cannot connect to",
    }
    for (source, target), message in cases.items():
        assert main(["migrate-store", "--from", source, "--to", target]) == 1
        err = capsys.readouterr().err
        assert message in err and "hunter2" not in err

"""The shared database goes away mid-run and comes back: the agent keeps running, orders paid
during the outage are delivered after it, nothing is delivered twice."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sandbox.platform import SandboxPlatform
from agent.store.postgres import PostgresStore
from tests.conftest import make_config, master_key_for_tests, pg_server_or_skip, stock
from tests.helpers import assert_platform_invariants, delivered_all, running_agent, wait_for
from tests.pg_server import PgServer

pytest.importorskip("asyncpg")


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    server = pg_server_or_skip(own=True)  # this test stops it: not the shared one
    yield server
    server.stop()


async def test_database_outage_loses_nothing(
    tmp_path: Path, sandbox: SandboxPlatform, own_server: PgServer
) -> None:
    store = PostgresStore(own_server.url, master_key_for_tests(), instance="solo")
    await store.open()
    try:
        await stock(store, "GAME-100", 100)
        before = [sandbox.add_order("GAME-100") for _ in range(20)]
        async with running_agent(make_config(tmp_path, sandbox.base_url), store, sandbox):
            await wait_for(delivered_all(sandbox, before), "deliveries before the outage")
            await asyncio.to_thread(own_server.halt)
            during = [sandbox.add_order("GAME-100", quantity=2) for _ in range(20)]
            await asyncio.sleep(1.5)  # polls, sweeps and deliveries fail against no database
            assert not any(sandbox.orders[o].delivery for o in during)
            await asyncio.to_thread(own_server.start_again)
            await wait_for(delivered_all(sandbox, during), "deliveries after the outage")
        counts = {c.sku: c for c in await store.stock_counts()}
        assert (counts["GAME-100"].bound, counts["GAME-100"].free) == (60, 40)
    finally:
        await store.close()
    assert_platform_invariants(sandbox)
